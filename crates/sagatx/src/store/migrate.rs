//! Copying a journal from one store to another (`sagatx migrate`).

use super::{Store, StoreError};

/// What [`copy`] copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Definition versions.
    pub definitions: usize,
    pub executions: usize,
    /// Unfinished operation-log entries (finished ones are history and stay
    /// behind).
    pub operations: usize,
}

fn refused(reason: String) -> StoreError {
    StoreError::Open {
        path: "the migration target".into(),
        reason,
    }
}

/// Copies every definition version, every execution (waiting and in-flight
/// ones included, state and sequence as they are), the unfinished
/// operations and the secret (so reply URLs handed out keep working) from
/// `from` to the empty store `to`, then reads both back and compares them.
/// Nothing must write to either meanwhile: opening a SQLite store takes its
/// one-process lock, so a server still running on one is refused before;
/// on PostgreSQL, the processes that use the database are registered, and
/// the copy is refused while any other is alive.
pub async fn copy(from: &dyn Store, to: &dyn Store) -> Result<CopyReport, StoreError> {
    for (which, store) in [("source", from), ("target", to)] {
        if let Some(l) = store.leases() {
            let n = l.peers().await?;
            if n > 0 {
                return Err(StoreError::Open {
                    path: format!("the migration {which}"),
                    reason: format!(
                        "{n} other sagatx process(es) use this database; stop them, then migrate"
                    ),
                });
            }
        }
    }
    if !to.list_definitions().await?.is_empty() || !to.scan(None, 1).await?.items.is_empty() {
        return Err(refused(
            "it already holds sagatx data; migrate into a new, empty store".into(),
        ));
    }
    let mut report = CopyReport::default();
    for (name, latest) in from.list_definitions().await? {
        for v in 1..=latest {
            let (_, def) = from.get_definition(&name, Some(v)).await?.ok_or_else(|| {
                StoreError::Io(format!(
                    "the source lost definition {name} v{v} while copying"
                ))
            })?;
            let reg = to.put_definition(&def).await?;
            if reg.version != v {
                return Err(refused(format!(
                    "definition {name} v{v} became v{} in the target",
                    reg.version
                )));
            }
            report.definitions += 1;
        }
    }
    let mut cursor = None;
    loop {
        let page = from.scan(cursor, 512).await?;
        for ex in &page.items {
            to.import(ex).await?;
            report.executions += 1;
        }
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    let mut after = None;
    loop {
        let ops = from.op_pending(after, 512).await?;
        let Some(last) = ops.last() else { break };
        after = Some(last.id);
        for op in &ops {
            to.op_record(&op.name, &op.args, op.created_at_ms).await?;
            report.operations += 1;
        }
    }
    to.import_secret(from.secret().await?).await?;
    verify(from, to, &report).await?;
    Ok(report)
}

/// Reads both stores back and compares them.
async fn verify(from: &dyn Store, to: &dyn Store, report: &CopyReport) -> Result<(), StoreError> {
    let bad = |what: String| StoreError::Io(format!("the copy differs from the source: {what}"));
    if from.list_definitions().await? != to.list_definitions().await? {
        return Err(bad("the definitions".into()));
    }
    let (mut a, mut b) = (None, None);
    let mut n = 0;
    loop {
        let pa = from.scan(a, 512).await?;
        let pb = to.scan(b, 512).await?;
        if pa.items != pb.items {
            return Err(bad(format!("the executions after the first {n}")));
        }
        n += pa.items.len();
        a = pa.next_cursor;
        b = pb.next_cursor;
        if a.is_none() || b.is_none() {
            if a.is_some() || b.is_some() {
                return Err(bad("the number of executions".into()));
            }
            break;
        }
    }
    if n != report.executions {
        return Err(bad(format!(
            "{n} executions read back, {} copied",
            report.executions
        )));
    }
    if from.secret().await? != to.secret().await? {
        return Err(bad("the secret".into()));
    }
    Ok(())
}
