//! Tables and timelines for the terminal.

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use serde_json::Value;

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A page of executions as a table (full ids).
pub fn table(page: &Value) -> String {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED)
        .set_header(["id", "saga", "version", "status", "created", "updated"]);
    let empty = Vec::new();
    for ex in page["items"].as_array().unwrap_or(&empty) {
        t.add_row([
            s(&ex["id"]),
            s(&ex["saga"]),
            s(&ex["saga_version"]),
            status_of(ex),
            s(&ex["created_at"]),
            s(&ex["updated_at"]),
        ]);
    }
    let mut out = t.to_string();
    if let Some(c) = page["next_cursor"].as_str() {
        out.push_str(&format!(
            "\nmore: --cursor {c} is not an option yet; narrow with --status or --saga"
        ));
    }
    out
}

fn status_of(ex: &Value) -> String {
    match ex["awaiting"].as_str() {
        Some(a) => format!("{} ({a})", s(&ex["status"])),
        None => s(&ex["status"]),
    }
}

/// One execution: a header, its steps as a timeline, its error.
pub fn execution(ex: &Value) -> String {
    let mut out = format!(
        "execution {}\nsaga      {} v{}\nstatus    {}\ninput     {}\ncreated   {}\nupdated   {}\n",
        s(&ex["id"]),
        s(&ex["saga"]),
        s(&ex["saga_version"]),
        status_of(ex),
        s(&ex["input"]),
        s(&ex["created_at"]),
        s(&ex["updated_at"]),
    );
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header([
        "#",
        "step",
        "status",
        "attempts",
        "compensations",
        "result",
        "error",
    ]);
    let empty = Vec::new();
    for (i, st) in ex["steps"].as_array().unwrap_or(&empty).iter().enumerate() {
        let err = match (&st["error"], &st["compensation_error"]) {
            (Value::Null, Value::Null) => "-".to_string(),
            (e, Value::Null) => s(e),
            (Value::Null, c) => format!("compensation: {}", s(c)),
            (e, c) => format!("{}; compensation: {}", s(e), s(c)),
        };
        t.add_row([
            (i + 1).to_string(),
            s(&st["name"]),
            s(&st["status"]),
            s(&st["attempts"]),
            s(&st["compensation_attempts"]),
            s(&st["result"]),
            err,
        ]);
    }
    out.push_str(&t.to_string());
    if !ex["error"].is_null() {
        out.push_str(&format!(
            "\nerror     {} at step {}\n",
            s(&ex["error"]["message"]),
            s(&ex["error"]["step"])
        ));
    }
    out
}

/// Prints a line for every step whose status or attempts changed.
pub fn progress(ex: &Value, seen: &mut Vec<String>) {
    let empty = Vec::new();
    let steps = ex["steps"].as_array().unwrap_or(&empty);
    seen.resize(steps.len(), String::new());
    for (i, st) in steps.iter().enumerate() {
        let line = format!(
            "  {:<20} {:<20} attempts {} compensations {}{}",
            s(&st["name"]),
            s(&st["status"]),
            s(&st["attempts"]),
            s(&st["compensation_attempts"]),
            match &st["error"] {
                Value::Null => String::new(),
                e => format!("  ({})", s(e)),
            }
        );
        if seen[i] != line {
            println!("{line}");
            seen[i] = line;
        }
    }
}

/// The last line of `run`.
pub fn summary(ex: &Value) -> String {
    let mut out = format!("execution {} is {}", s(&ex["id"]), status_of(ex));
    if !ex["error"].is_null() {
        out.push_str(&format!(
            ": {} (step {})",
            s(&ex["error"]["message"]),
            s(&ex["error"]["step"])
        ));
    }
    out
}

/// Live progress on a terminal: one spinner line per step.
pub struct Bars {
    bars: Vec<indicatif::ProgressBar>,
    _multi: indicatif::MultiProgress,
}

fn step_line(st: &Value) -> String {
    let mut line = format!(
        "{:<20} {:<20} attempts {} compensations {}",
        s(&st["name"]),
        s(&st["status"]),
        s(&st["attempts"]),
        s(&st["compensation_attempts"])
    );
    if !st["error"].is_null() {
        line.push_str(&format!("  ({})", s(&st["error"])));
    }
    line
}

impl Bars {
    pub fn new(ex: &Value) -> Bars {
        let multi = indicatif::MultiProgress::new();
        let style = indicatif::ProgressStyle::with_template("  {spinner} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
        let empty = Vec::new();
        let bars = ex["steps"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|st| {
                let b = multi.add(indicatif::ProgressBar::new_spinner());
                b.set_style(style.clone());
                b.set_message(step_line(st));
                b.enable_steady_tick(std::time::Duration::from_millis(120));
                b
            })
            .collect();
        Bars {
            bars,
            _multi: multi,
        }
    }

    pub fn update(&self, ex: &Value) {
        let empty = Vec::new();
        for (b, st) in self
            .bars
            .iter()
            .zip(ex["steps"].as_array().unwrap_or(&empty))
        {
            b.set_message(step_line(st));
        }
    }

    pub fn finish(&self, ex: &Value) {
        let empty = Vec::new();
        for (b, st) in self
            .bars
            .iter()
            .zip(ex["steps"].as_array().unwrap_or(&empty))
        {
            b.finish_with_message(step_line(st));
        }
    }
}
