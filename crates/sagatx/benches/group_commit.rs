//! Micro-benchmark of the SQLite group commit: `n` executions appended at
//! once, which the writer thread applies in one transaction and one fsync
//! (`synchronous=FULL`, on the disk that holds the temporary directory).
//! `cargo bench -p sagatx --bench group_commit`; not run by the test suite.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use divan::Bencher;
use sagatx::core::{Env, Event, Execution, ExecutionId, SagaDefinition};
use sagatx::{SqliteStore, Store};
use serde_json::json;

fn main() {
    divan::main();
}

/// One batch of `n` new executions, appended concurrently and waited for.
#[divan::bench(args = [1, 64, 512], sample_count = 20)]
fn batch(b: Bencher, n: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("b.db")).unwrap());
    let def = SagaDefinition::from_json(
        br#"{"name":"b","steps":[{"name":"a","action":{"url":"http://127.0.0.1:9/a"}}]}"#,
    )
    .unwrap();
    let env = Env {
        now_ms: 1,
        random01: 0.5,
    };
    b.with_inputs(|| {
        (0..n)
            .map(|_| {
                let mut ex = Execution::new(
                    ExecutionId(uuid::Uuid::now_v7()),
                    &def,
                    1,
                    json!({}),
                    None,
                    1,
                );
                ex.handle(&def, Event::Start, env).unwrap();
                ex.seq = 1;
                ex
            })
            .collect::<Vec<_>>()
    })
    .bench_local_values(|batch| {
        rt.block_on(async {
            let writes = batch.iter().map(|ex| store.append(ex));
            for r in futures_util::future::join_all(writes).await {
                r.unwrap();
            }
        })
    });
}
