//! The API's JSON of an execution (API.md §3) written by hand: the same
//! bytes as serde writes for [`ExecutionView`](crate::execution::ExecutionView).
//! That implementation stays the definition; it writes through serde's map
//! machinery entry by entry, about 24,000 instructions for a three-step
//! execution (a twentieth of what the coordinator does per HTTP saga),
//! this a third of that. Keys are the constant bytes they are, in serde's
//! (sorted) order; strings and values go through the journal encoder's
//! writers, which escape as serde_json does. A field added to a view must
//! be added here too: debug builds compare the two writers at every call
//! (`Execution::write_view`), so any test that reads an execution through
//! the API would show the difference.

use serde_json::Value;

use crate::error::CompensationOutcome;
use crate::execution::{rfc3339_ms, Attempt, Awaiting, Execution, StepState};
use crate::journal::{int, string, value};

/// Appends the view of `e` to `out`.
pub(crate) fn write(e: &Execution, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    out.reserve(512 + 512 * e.steps.len());
    out.extend_from_slice(b"{\"awaiting\":");
    out.extend_from_slice(match e.awaiting {
        None => b"null".as_slice(),
        Some(Awaiting::Reply) => b"\"reply\"",
        Some(Awaiting::Commit) => b"\"commit\"",
    });
    out.extend_from_slice(b",\"created_at\":");
    time(out, e.created_at_ms);
    out.extend_from_slice(b",\"error\":");
    match e.saga_error() {
        None => out.extend_from_slice(b"null"),
        Some(err) => {
            out.extend_from_slice(b"{\"compensations\":");
            array(out, err.compensations.iter(), compensation)?;
            out.extend_from_slice(b",\"message\":");
            string(out, &err.message)?;
            out.extend_from_slice(b",\"step\":");
            optional_string(out, err.step.as_deref())?;
            out.push(b'}');
        }
    }
    out.extend_from_slice(b",\"id\":\"");
    out.extend_from_slice(
        e.id.0
            .hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer())
            .as_bytes(),
    );
    out.extend_from_slice(b"\",\"input\":");
    value(out, &e.input)?;
    out.extend_from_slice(b",\"results\":{");
    let mut results: Vec<(&str, &Value)> = e
        .steps
        .iter()
        .filter_map(|s| Some((s.name.as_str(), s.result.as_ref()?)))
        .collect();
    results.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (i, (name, result)) in results.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, name)?;
        out.push(b':');
        value(out, result)?;
    }
    out.extend_from_slice(b"},\"saga\":");
    string(out, e.saga.as_str())?;
    out.extend_from_slice(b",\"saga_version\":");
    int(out, u64::from(e.saga_version));
    out.extend_from_slice(b",\"status\":");
    string(out, e.status.as_str())?;
    out.extend_from_slice(b",\"steps\":");
    array(out, e.steps.iter(), step)?;
    out.extend_from_slice(b",\"updated_at\":");
    time(out, e.updated_at_ms);
    out.extend_from_slice(b",\"user\":");
    optional_string(out, e.user.as_deref())?;
    out.push(b'}');
    Ok(())
}

/// One compensation of a saga error's view.
fn compensation(out: &mut Vec<u8>, c: &CompensationOutcome) -> Result<(), serde_json::Error> {
    out.extend_from_slice(b"{\"error\":");
    optional_string(out, c.error.as_deref())?;
    out.extend_from_slice(b",\"status\":");
    string(out, c.status.as_str())?;
    out.extend_from_slice(b",\"step\":");
    string(out, &c.step)?;
    out.push(b'}');
    Ok(())
}

/// A step's view (the fields of `StepView`).
fn step(out: &mut Vec<u8>, s: &StepState) -> Result<(), serde_json::Error> {
    out.extend_from_slice(b"{\"attempts\":");
    int(out, u64::from(s.attempts));
    out.extend_from_slice(b",\"compensation_attempts\":");
    int(out, u64::from(s.compensation_attempts));
    out.extend_from_slice(b",\"compensation_error\":");
    optional_string(out, s.compensation_error.as_deref())?;
    out.extend_from_slice(b",\"confirm_attempts\":");
    int(out, u64::from(s.confirm_attempts));
    out.extend_from_slice(b",\"confirm_error\":");
    optional_string(out, s.confirm_error.as_deref())?;
    out.extend_from_slice(b",\"error\":");
    optional_string(out, s.error.as_deref())?;
    out.extend_from_slice(b",\"history\":");
    array(out, s.history.iter(), attempt)?;
    out.extend_from_slice(b",\"name\":");
    string(out, s.name.as_str())?;
    out.extend_from_slice(b",\"next_attempt_at\":");
    optional_time(out, s.due_at_ms);
    out.extend_from_slice(b",\"result\":");
    match &s.result {
        Some(r) => value(out, r)?,
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"status\":");
    string(out, s.status.as_str())?;
    out.push(b'}');
    Ok(())
}

/// One call in a step's history (the fields of `AttemptView`).
fn attempt(out: &mut Vec<u8>, a: &Attempt) -> Result<(), serde_json::Error> {
    let Attempt {
        phase,
        attempt,
        started_at_ms,
        ended_at_ms,
        outcome,
        error,
    } = a;
    out.extend_from_slice(b"{\"attempt\":");
    int(out, u64::from(*attempt));
    out.extend_from_slice(b",\"ended_at\":");
    optional_time(out, *ended_at_ms);
    out.extend_from_slice(b",\"error\":");
    optional_string(out, error.as_deref())?;
    out.extend_from_slice(b",\"outcome\":");
    optional_string(out, outcome.map(|o| o.as_str()))?;
    out.extend_from_slice(b",\"phase\":");
    string(out, phase.as_str())?;
    out.extend_from_slice(b",\"started_at\":");
    time(out, *started_at_ms);
    out.push(b'}');
    Ok(())
}

/// A JSON array of `items`, each written by `item`.
fn array<'a, T: 'a>(
    out: &mut Vec<u8>,
    items: impl Iterator<Item = &'a T>,
    item: fn(&mut Vec<u8>, &T) -> Result<(), serde_json::Error>,
) -> Result<(), serde_json::Error> {
    out.push(b'[');
    for (i, x) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        item(out, x)?;
    }
    out.push(b']');
    Ok(())
}

fn optional_string(out: &mut Vec<u8>, s: Option<&str>) -> Result<(), serde_json::Error> {
    match s {
        Some(s) => string(out, s),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

/// A time as the views write it: an RFC 3339 string with milliseconds.
fn time(out: &mut Vec<u8>, ms: u64) {
    out.push(b'"');
    out.extend_from_slice(&rfc3339_ms(ms));
    out.push(b'"');
}

fn optional_time(out: &mut Vec<u8>, ms: Option<u64>) {
    match ms {
        Some(ms) => time(out, ms),
        None => out.extend_from_slice(b"null"),
    }
}
