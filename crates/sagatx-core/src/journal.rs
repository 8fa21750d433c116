//! The journal entry of an execution written by hand: the same bytes as
//! `serde_json::to_vec(&execution)` (the derived `Serialize` is the
//! format's definition, and the decoder), written several times faster,
//! since it is written at every transition. Keys are written as the
//! constant bytes they are instead of being escaped one by one, and strings
//! without a character to escape are copied as they are. Each type is
//! destructured field by field (no `..`), so a field added to a type does
//! not compile until it is written here; and debug builds compare every
//! entry with serde's (see `Execution::to_raw`).

use serde_json::Value;

use crate::definition::Phase;
use crate::execution::{Attempt, Execution, Exempt, Reply, StepState};

/// Appends the JSON of `ex` to `out`, every time in it (`created_at_ms`,
/// `updated_at_ms`, `due_at_ms`, an attempt's `s` and `e`) written as
/// `time - base_ms` (wrapping, so that any time comes back exactly as
/// `written + base_ms`): `base_ms` 0 writes the format itself.
pub(crate) fn encode(
    ex: &Execution,
    base_ms: u64,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    encode_with(ex, base_ms, true, out)
}

/// [`encode`], with the id's value written (`with_id`) or left empty
/// (`"id":""`, for a store that keeps the id in a column of its own).
pub(crate) fn encode_with(
    ex: &Execution,
    base_ms: u64,
    with_id: bool,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    // Every field named, none left to `..`: a field added to the type does
    // not compile here until the encoder writes it.
    let Execution {
        format_version: _,
        id: _,
        saga: _,
        saga_version: _,
        status: _,
        awaiting: _,
        input: _,
        steps: _,
        failure: _,
        committing: _,
        user: _,
        created_at_ms: _,
        updated_at_ms: _,
        seq: _,
    } = ex;
    out.extend_from_slice(b"{\"format_version\":");
    int(out, u64::from(ex.format_version));
    out.extend_from_slice(b",\"id\":\"");
    if with_id {
        out.extend_from_slice(
            ex.id
                .0
                .hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer())
                .as_bytes(),
        );
    }
    out.extend_from_slice(b"\",\"saga\":");
    string(out, ex.saga.as_str())?;
    out.extend_from_slice(b",\"saga_version\":");
    int(out, u64::from(ex.saga_version));
    out.extend_from_slice(b",\"status\":\"");
    out.extend_from_slice(ex.status.as_str().as_bytes());
    out.push(b'"');
    if let Some(a) = ex.awaiting {
        out.extend_from_slice(match a {
            crate::Awaiting::Reply => b",\"awaiting\":\"reply\"".as_slice(),
            crate::Awaiting::Commit => b",\"awaiting\":\"commit\"".as_slice(),
        });
    }
    out.extend_from_slice(b",\"input\":");
    value(out, &ex.input)?;
    out.extend_from_slice(b",\"steps\":[");
    for (i, s) in ex.steps.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        step(out, s, base_ms)?;
    }
    out.push(b']');
    if let Some(f) = &ex.failure {
        let crate::Failure {
            step: _,
            message: _,
        } = f;
        out.extend_from_slice(b",\"failure\":{\"step\":");
        match &f.step {
            Some(s) => string(out, s)?,
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"message\":");
        string(out, &f.message)?;
        out.push(b'}');
    }
    if ex.committing {
        out.extend_from_slice(b",\"committing\":true");
    }
    if let Some(u) = &ex.user {
        out.extend_from_slice(b",\"user\":");
        string(out, u)?;
    }
    out.extend_from_slice(b",\"created_at_ms\":");
    int(out, ex.created_at_ms.wrapping_sub(base_ms));
    out.extend_from_slice(b",\"updated_at_ms\":");
    int(out, ex.updated_at_ms.wrapping_sub(base_ms));
    out.extend_from_slice(b",\"seq\":");
    int(out, ex.seq);
    out.push(b'}');
    Ok(())
}

fn step(out: &mut Vec<u8>, s: &StepState, base_ms: u64) -> Result<(), serde_json::Error> {
    let StepState {
        name: _,
        status: _,
        attempts: _,
        compensation_attempts: _,
        confirm_attempts: _,
        exempt:
            Exempt {
                action: _,
                compensation: _,
                confirm: _,
            },
        result: _,
        error: _,
        compensation_error: _,
        confirm_error: _,
        outcome_unknown: _,
        in_flight: _,
        due_at_ms: _,
        owed: _,
        reply: _,
        history: _,
    } = s;
    out.extend_from_slice(b"{\"name\":");
    string(out, s.name.as_str())?;
    out.extend_from_slice(b",\"status\":\"");
    out.extend_from_slice(s.status.as_str().as_bytes());
    out.push(b'"');
    counter(out, b",\"attempts\":", s.attempts);
    counter(out, b",\"compensation_attempts\":", s.compensation_attempts);
    counter(out, b",\"confirm_attempts\":", s.confirm_attempts);
    if s.exempt != Exempt::default() {
        out.extend_from_slice(b",\"exempt\":{");
        let mut first = true;
        for (key, n) in [
            (b"\"action\":".as_slice(), s.exempt.action),
            (b"\"compensation\":".as_slice(), s.exempt.compensation),
            (b"\"confirm\":".as_slice(), s.exempt.confirm),
        ] {
            if n != 0 {
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(key);
                int(out, u64::from(n));
            }
        }
        out.push(b'}');
    }
    if let Some(r) = &s.result {
        out.extend_from_slice(b",\"result\":");
        value(out, r)?;
    }
    optional_string(out, b",\"error\":", s.error.as_deref())?;
    optional_string(
        out,
        b",\"compensation_error\":",
        s.compensation_error.as_deref(),
    )?;
    optional_string(out, b",\"confirm_error\":", s.confirm_error.as_deref())?;
    if s.outcome_unknown {
        out.extend_from_slice(b",\"outcome_unknown\":true");
    }
    if let Some(p) = s.in_flight {
        out.extend_from_slice(b",\"in_flight\":\"");
        out.extend_from_slice(p.as_str().as_bytes());
        out.push(b'"');
    }
    if let Some(d) = s.due_at_ms {
        out.extend_from_slice(b",\"due_at_ms\":");
        int(out, d.wrapping_sub(base_ms));
    }
    if let Some(p) = s.owed {
        out.extend_from_slice(b",\"owed\":\"");
        out.extend_from_slice(p.as_str().as_bytes());
        out.push(b'"');
    }
    if let Some(r) = &s.reply {
        match r {
            Reply::Ok(v) => {
                out.extend_from_slice(b",\"reply\":{\"ok\":");
                value(out, v)?;
            }
            Reply::Err(e) => {
                out.extend_from_slice(b",\"reply\":{\"err\":");
                string(out, e)?;
            }
        }
        out.push(b'}');
    }
    if !s.history.is_empty() {
        out.extend_from_slice(b",\"history\":[");
        for (i, a) in s.history.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            attempt(out, a, base_ms)?;
        }
        out.push(b']');
    }
    out.push(b'}');
    Ok(())
}

fn attempt(out: &mut Vec<u8>, a: &Attempt, base_ms: u64) -> Result<(), serde_json::Error> {
    let Attempt {
        phase: _,
        attempt: _,
        started_at_ms: _,
        ended_at_ms: _,
        outcome: _,
        error: _,
    } = a;
    out.extend_from_slice(match a.phase {
        Phase::Action => b"{\"p\":\"a\",\"n\":".as_slice(),
        Phase::Compensation => b"{\"p\":\"c\",\"n\":".as_slice(),
        Phase::Confirm => b"{\"p\":\"f\",\"n\":".as_slice(),
    });
    int(out, u64::from(a.attempt));
    out.extend_from_slice(b",\"s\":");
    int(out, a.started_at_ms.wrapping_sub(base_ms));
    if let Some(e) = a.ended_at_ms {
        out.extend_from_slice(b",\"e\":");
        int(out, e.wrapping_sub(base_ms));
    }
    if let Some(o) = a.outcome {
        out.extend_from_slice(b",\"o\":\"");
        out.extend_from_slice(o.as_str().as_bytes());
        out.push(b'"');
    }
    optional_string(out, b",\"x\":", a.error.as_deref())?;
    out.push(b'}');
    Ok(())
}

pub(crate) fn int(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A count that is left out when zero.
fn counter(out: &mut Vec<u8>, key: &[u8], n: u32) {
    if n != 0 {
        out.extend_from_slice(key);
        int(out, u64::from(n));
    }
}

fn optional_string(
    out: &mut Vec<u8>,
    key: &[u8],
    s: Option<&str>,
) -> Result<(), serde_json::Error> {
    if let Some(s) = s {
        out.extend_from_slice(key);
        string(out, s)?;
    }
    Ok(())
}

/// A JSON string: copied between quotes when nothing in it needs escaping
/// (serde_json escapes exactly the control characters, `"` and `\`),
/// otherwise written by serde_json.
pub(crate) fn string(out: &mut Vec<u8>, s: &str) -> Result<(), serde_json::Error> {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(&mut *out, s)
    }
}

pub(crate) fn value(out: &mut Vec<u8>, v: &Value) -> Result<(), serde_json::Error> {
    match v {
        Value::Null => {
            out.extend_from_slice(b"null");
            Ok(())
        }
        v => serde_json::to_writer(&mut *out, v),
    }
}
