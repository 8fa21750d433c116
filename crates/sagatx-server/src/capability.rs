//! Capabilities in reply URLs: an HMAC of the execution and step under the
//! store's secret, so a reply to its one step needs no bearer token, and
//! every process on the same store accepts the others' URLs.

use hmac::{Hmac, KeyInit, Mac};
use sagatx_core::ExecutionId;
use sha2::Sha256;

/// Makes and checks reply URLs.
#[derive(Clone)]
pub struct Capabilities {
    secret: [u8; 32],
    base_url: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

impl Capabilities {
    /// `base_url` is where step services reach this coordinator, such as
    /// `http://127.0.0.1:7700`.
    pub fn new(secret: [u8; 32], base_url: impl Into<String>) -> Self {
        Capabilities {
            secret,
            base_url: base_url.into().trim_end_matches('/').to_string(),
        }
    }

    fn mac(&self, id: ExecutionId, step: &str) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(b"sagatx-reply\0");
        mac.update(id.0.as_bytes());
        mac.update(step.as_bytes());
        mac
    }

    /// The capability for one step of one execution.
    pub fn token(&self, id: ExecutionId, step: &str) -> String {
        hex(&self.mac(id, step).finalize().into_bytes())
    }

    /// Checks a capability, in constant time.
    pub fn verify(&self, id: ExecutionId, step: &str, token: &str) -> bool {
        match unhex(token) {
            Some(bytes) => self.mac(id, step).verify_slice(&bytes).is_ok(),
            None => false,
        }
    }

    /// The full reply URL of a step (API.md §2), with its capability.
    pub fn reply_url(&self, id: ExecutionId, step: &str) -> String {
        format!(
            "{}/v1/executions/{}/steps/{}/reply?cap={}",
            self.base_url,
            id,
            step,
            self.token(id, step)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capability_opens_only_its_own_step() {
        let caps = Capabilities::new([7; 32], "http://127.0.0.1:7700/");
        let id = ExecutionId(uuid::Uuid::from_u128(1));
        let other = ExecutionId(uuid::Uuid::from_u128(2));
        let t = caps.token(id, "ship");
        assert!(caps.verify(id, "ship", &t));
        assert!(!caps.verify(id, "bill", &t));
        assert!(!caps.verify(other, "ship", &t));
        assert!(!caps.verify(id, "ship", "zz"));
        assert!(!Capabilities::new([8; 32], "x").verify(id, "ship", &t));
        let url = caps.reply_url(id, "ship");
        assert!(url.starts_with("http://127.0.0.1:7700/v1/executions/00000000-0000-0000-0000-000000000001/steps/ship/reply?cap="));
    }
}
