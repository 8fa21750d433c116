//! A small client of the coordinator's API.

use anyhow::{anyhow, Result};
use serde_json::Value;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(base: &str, token: Option<&str>) -> Result<Self> {
        sagatx_server::install_crypto();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(anyhow!(
                "--server {base:?} is not an http:// or https:// URL"
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(90))
            .build()
            .map_err(|e| anyhow!("cannot build the HTTP client: {e}"))?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: token.map(str::to_string),
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "cannot reach the coordinator at {}; start it with `sagatx serve`, or point --server at it",
                    self.base
                )
            } else {
                anyhow!("the request to {} failed: {e}", self.base)
            }
        })?;
        let status = resp.status();
        let body: Value = resp.json().await.map_err(|e| {
            anyhow!("the coordinator answered {status} with a body that is not JSON: {e}")
        })?;
        if status.is_success() {
            return Ok(body);
        }
        let msg = body["error"]["message"].as_str().unwrap_or("no message");
        if status.as_u16() == 401 {
            return Err(anyhow!("{msg} (set --token or SAGATX_TOKEN)"));
        }
        Err(anyhow!("{msg} (HTTP {status})"))
    }

    pub async fn get(&self, path: &str, query: &[(String, String)]) -> Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)).query(query))
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }
}
