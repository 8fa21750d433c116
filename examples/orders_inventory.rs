//! pymongo's `with_transaction` example, on PostgreSQL: insert an order
//! and decrement the inventory in one transaction; a transient error
//! retries the callback, an unknown commit result retries only the commit.
//!
//! ```sh
//! SAGATX_PG_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   cargo run --features postgres --example orders_inventory
//! ```
//!
//! The PostgreSQL server needs `max_prepared_transactions` above 0
//! (`scripts/test-postgres start` starts one that has it).

use std::sync::Arc;

use sagatx::transaction::{
    with_transaction, PostgresDataManager, StoreDecisions, TxError, WithTransaction,
};
use sagatx::{MemoryStore, Store};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("SAGATX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:25432/postgres".into());
    let (setup, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}; set SAGATX_PG_URL"))?;
    tokio::spawn(conn);
    setup
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS inventory (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS orders (id SERIAL PRIMARY KEY, sku TEXT, qty INTEGER);
             INSERT INTO inventory VALUES ('abc123', 1000) ON CONFLICT DO NOTHING;",
        )
        .await?;
    let decisions: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let opts = WithTransaction::new(sagatx::transaction::TransactionManager::new());
    let url2 = url.clone();
    let order = with_transaction(&opts, move |tx| {
        let url = url2.clone();
        let decisions = decisions.clone();
        async move {
            tx.set_decision_log(Arc::new(StoreDecisions(decisions)));
            let db = PostgresDataManager::begin("shop", &url).await?;
            tx.join(db.clone())
                .map_err(|e| TxError::permanent(e.to_string()))?;
            let pg = |e: tokio_postgres::Error| TxError::transient(e.to_string());
            let row = db
                .client()
                .query_one(
                    "INSERT INTO orders (sku, qty) VALUES ('abc123', 100) RETURNING id",
                    &[],
                )
                .await
                .map_err(pg)?;
            db.client()
                .execute(
                    "UPDATE inventory SET qty = qty - 100 WHERE sku = 'abc123' AND qty >= 100",
                    &[],
                )
                .await
                .map_err(pg)?;
            Ok(row.get::<_, i32>(0))
        }
    })
    .await?;
    let qty: i32 = setup
        .query_one("SELECT qty FROM inventory WHERE sku = 'abc123'", &[])
        .await?
        .get(0);
    println!("order {order} committed; inventory of abc123 is now {qty}");
    Ok(())
}
