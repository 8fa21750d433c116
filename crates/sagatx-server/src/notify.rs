//! Notifications: a POST to each `--notify-url` when an execution becomes
//! `paused`, `failed`, `compensated` or `completed` (filterable), retried
//! with backoff, so that a stuck or failed saga reaches a person.
//!
//! The body is `{"event": "execution.status", "status": …, "execution":
//! {…API.md §3…}}` with the header `Idempotency-Key:
//! {execution_id}:{status}:{seq}`, the same on every retry. Delivery is
//! best effort from memory: a notification queued when the process dies is
//! lost (the execution itself is not). At most [`QUEUE`] wait; beyond, new
//! ones are dropped and logged. A redirect is not followed: it is logged
//! and the notification given up for that URL.

use std::sync::Arc;
use std::time::Duration;

use sagatx::{Execution, Status, StatusHook};
use tokio::sync::mpsc;

/// Notifications waiting at most.
pub const QUEUE: usize = 10_000;
/// Attempts per notification and URL.
pub const ATTEMPTS: u32 = 6;

/// Where notifications go and which statuses they are for.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    pub urls: Vec<String>,
    pub statuses: Vec<Status>,
}

impl NotifyConfig {
    /// The statuses notified by default.
    pub fn default_statuses() -> Vec<Status> {
        vec![
            Status::Paused,
            Status::Failed,
            Status::Compensated,
            Status::Completed,
        ]
    }
}

/// Starts the sender task; returns the hook to give the engine.
pub fn start(cfg: NotifyConfig) -> Option<StatusHook> {
    if cfg.urls.is_empty() {
        return None;
    }
    crate::install_crypto();
    let (tx, rx) = mpsc::channel::<Execution>(QUEUE);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        // As webhook senders do: a redirect is not followed (a 301-303
        // would turn the POST into a GET without the notification, and a
        // 307 would carry it to a URL nobody configured).
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .ok()?;
    tokio::spawn(sender(client, Arc::new(cfg.urls), rx));
    let statuses = cfg.statuses;
    Some(Arc::new(move |ex: &Execution| {
        if !statuses.contains(&ex.status) {
            return;
        }
        if tx.try_send(ex.clone()).is_err() {
            tracing::warn!(execution = %ex.id, "notification queue full; notification dropped");
        }
    }))
}

async fn sender(
    client: reqwest::Client,
    urls: Arc<Vec<String>>,
    mut rx: mpsc::Receiver<Execution>,
) {
    while let Some(ex) = rx.recv().await {
        let body = match body(&ex) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(execution = %ex.id, error = %e, "cannot write a notification");
                continue;
            }
        };
        let key = format!("{}:{}:{}", ex.id, ex.status.as_str(), ex.seq);
        for url in urls.iter() {
            // The body is written once and shared by every URL and retry.
            let (client, url, body, key) = (client.clone(), url.clone(), body.clone(), key.clone());
            // Each delivery retries on its own, so one slow receiver does
            // not hold the others up.
            tokio::spawn(async move {
                let mut backoff = Duration::from_millis(200);
                for attempt in 1..=ATTEMPTS {
                    let sent = client
                        .post(&url)
                        .header("Idempotency-Key", &key)
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().is_success() => return,
                        Ok(r) if r.status().is_redirection() => {
                            let to = crate::redirect_location(&r).unwrap_or_default();
                            tracing::error!(%url, status = %r.status(), location = %to, %key,
                                "notification answered with a redirect, which is not followed: point --notify-url at the final URL");
                            return;
                        }
                        Ok(r) => {
                            tracing::warn!(%url, status = %r.status(), attempt, "notification refused")
                        }
                        Err(e) => tracing::warn!(%url, error = %e, attempt, "notification failed"),
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                tracing::error!(%url, %key, "notification given up after {ATTEMPTS} attempts");
            });
        }
    }
}

/// A notification's body: `{"event", "execution", "status"}`, the keys in
/// the order serde_json sorts them, the execution's view written once by
/// `Execution::write_view` (no JSON tree of it).
fn body(ex: &Execution) -> Result<bytes::Bytes, serde_json::Error> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(br#"{"event":"execution.status","execution":"#);
    ex.write_view(&mut out)?;
    out.extend_from_slice(br#","status":""#);
    out.extend_from_slice(ex.status.as_str().as_bytes());
    out.extend_from_slice(br#""}"#);
    Ok(out.into())
}
