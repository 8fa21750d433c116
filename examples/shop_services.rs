//! Small step services for the coordinator's quickstart, on 127.0.0.1:9001:
//! inventory (`/reserve`, `/release`), payment (`/charge`, `/refund`) and
//! shipping (`/ship`). Each prints the calls it receives.
//!
//! ```sh
//! cargo run --example shop_services &
//! sagatx serve &
//! sagatx run examples/order.json --input '{"order_id": 7}'                       # completes
//! sagatx run examples/order.json --input '{"order_id": 8, "card": "declined"}'   # compensated
//! ```

use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

async fn step(
    Path(op): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    println!(
        "{op:<8} execution {} attempt {} key {key}",
        body["execution_id"].as_str().unwrap_or("?"),
        body["attempt"]
    );
    let input = &body["input"];
    match op.as_str() {
        "reserve" => (
            StatusCode::OK,
            Json(json!({"reservation": format!("r-{}", input["order_id"])})),
        ),
        "charge" if input["card"] == json!("declined") => (
            StatusCode::PAYMENT_REQUIRED,
            Json(json!({"error": "card declined"})),
        ),
        "charge" => (
            StatusCode::OK,
            Json(json!({"payment": format!("p-{}", input["order_id"])})),
        ),
        "ship" => (
            StatusCode::OK,
            Json(json!({"tracking": format!("t-{}", input["order_id"])})),
        ),
        "release" | "refund" => (StatusCode::OK, Json(json!({"undone": op}))),
        _ => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no operation {op}")})),
        ),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("SHOP_LISTEN").unwrap_or_else(|_| "127.0.0.1:9001".into());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    println!("shop services on http://{addr}");
    axum::serve(listener, Router::new().route("/{op}", post(step))).await?;
    Ok(())
}
