//! py-api-saga's own example, durable: update the product's state, then the
//! shipping state; when shipping fails, the product's state is put back.
//!
//! ```sh
//! cargo run --example shop                   # completes
//! cargo run --example shop -- --fail-shipping # shipping fails: compensated
//! ```
//!
//! The journal is `sagatx.db` in the working directory (SQLite, no set-up).
//! Run it twice: the second run finds the first run's executions in the
//! journal, and any that a crash interrupted are finished by `recover`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sagatx::{Engine, Saga, SqliteStore, Status, StepContext, StepError};
use serde_json::{json, Value};

/// Stands in for the product and shipping services of the original example.
#[derive(Default)]
struct Services {
    product_state: Mutex<HashMap<String, String>>,
    shipping_state: Mutex<HashMap<String, String>>,
}

fn set(map: &Mutex<HashMap<String, String>>, key: &str, value: &str) {
    map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key.to_string(), value.to_string());
}

fn product_of(ctx: &StepContext) -> Result<String, StepError> {
    ctx.input()["product"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| StepError::permanent("the input has no \"product\""))
}

/// The steps change in-memory state and never wait: plain functions
/// (`step_sync`), as py-api-saga's are, called with no future.
fn saga(services: Arc<Services>) -> Result<Saga, sagatx::core::DefinitionError> {
    let (s1, s2, s3) = (services.clone(), services.clone(), services);
    Saga::builder("product-shipping")
        .step_sync("update-product-state", move |ctx: StepContext| {
            let product = product_of(&ctx)?;
            println!("  product {product}: in_stock -> sold_out");
            set(&s1.product_state, &product, "sold_out");
            Ok::<_, StepError>(json!({"product": product, "state": "sold_out"}))
        })
        .compensate_sync(move |ctx: StepContext| {
            let product = product_of(&ctx)?;
            println!("  product {product}: sold_out -> in_stock (compensation)");
            set(&s2.product_state, &product, "in_stock");
            Ok::<_, StepError>(())
        })
        .step_sync("update-shipping-state", move |ctx: StepContext| {
            let product = product_of(&ctx)?;
            // Earlier results are visible to later steps.
            let sold = &ctx.results()["update-product-state"]["state"];
            if ctx.input()["fail_shipping"] == json!(true) {
                println!("  shipping {product}: refused (the product is {sold})");
                return Err(StepError::permanent(
                    "shipping service: no courier available",
                ));
            }
            println!("  shipping {product}: ready_to_dispatch (the product is {sold})");
            set(&s3.shipping_state, &product, "ready_to_dispatch");
            Ok(json!({"state": "ready_to_dispatch"}))
        })
        .build()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fail = std::env::args().any(|a| a == "--fail-shipping");
    let services = Arc::new(Services::default());
    let store = SqliteStore::open("sagatx.db")?;
    let engine = Engine::builder()
        .store(store)
        .saga(saga(services)?)
        .build()
        .await?;
    let recovered = engine.recover().await?;
    if recovered.resumed > 0 {
        println!("recovered {} interrupted execution(s)", recovered.resumed);
    }

    println!("running product-shipping (fail_shipping: {fail})");
    let ex = engine
        .run(
            "product-shipping",
            json!({"product": "123", "fail_shipping": fail}),
        )
        .await?;
    println!("execution {} is {}", ex.id, ex.status);
    for s in &ex.steps {
        println!(
            "  step {:<24} {:<12} attempts {} compensations {}",
            s.name,
            s.status.as_str(),
            s.attempts,
            s.compensation_attempts
        );
    }
    if let Some(err) = ex.saga_error() {
        // py-api-saga's SagaException: the failing operation, its error, and
        // what became of each compensation.
        println!("failed at {:?}: {}", err.step, err.message);
        for c in &err.compensations {
            println!("  compensation of {}: {}", c.step, c.status.as_str());
        }
    } else {
        println!("results: {}", Value::Object(ex.results()));
    }
    let total = engine
        .list(sagatx::ListQuery {
            limit: 1000,
            ..Default::default()
        })
        .await?
        .items
        .len();
    println!("the journal sagatx.db holds {total} execution(s)");
    std::process::exit(if ex.status == Status::Completed { 0 } else { 1 });
}
