//! A saga as a Mermaid flowchart.

use sagatx_core::{Mode, ReplyMode, SagaDefinition};

fn id(i: usize) -> String {
    format!("s{i}")
}

/// Sequential steps in a row, concurrent ones side by side; compensations
/// and confirms hang off their step with dotted links.
pub fn mermaid(def: &SagaDefinition) -> String {
    let mut out = String::from("flowchart LR\n");
    out.push_str(&format!("  start((\"{}\"))\n", def.name));
    out.push_str("  done((\"done\"))\n");
    for (i, s) in def.steps.iter().enumerate() {
        let label = match s.reply {
            ReplyMode::Callback => format!("{}<br/>(waits for reply)", s.name),
            ReplyMode::Sync => s.name.clone(),
        };
        out.push_str(&format!("  {}[\"{}\"]\n", id(i), label));
    }
    match def.mode {
        Mode::Sequential => {
            out.push_str(&format!("  start --> {}\n", id(0)));
            for i in 1..def.steps.len() {
                out.push_str(&format!("  {} --> {}\n", id(i - 1), id(i)));
            }
            out.push_str(&format!("  {} --> done\n", id(def.steps.len() - 1)));
        }
        Mode::Concurrent => {
            for i in 0..def.steps.len() {
                out.push_str(&format!("  start --> {}\n  {} --> done\n", id(i), id(i)));
            }
        }
    }
    for (i, s) in def.steps.iter().enumerate() {
        if s.compensation.is_some() {
            out.push_str(&format!(
                "  {}_undo[\"undo {}\"]\n  {} -. compensation .-> {}_undo\n",
                id(i),
                s.name,
                id(i),
                id(i)
            ));
        }
        if s.confirm.is_some() {
            out.push_str(&format!(
                "  {}_confirm[\"confirm {}\"]\n  {} -. confirm .-> {}_confirm\n",
                id(i),
                s.name,
                id(i),
                id(i)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_steps_are_chained_and_compensations_hang_off() {
        let def = SagaDefinition::from_json(
            br#"{"name":"order","steps":[
              {"name":"reserve","action":{"url":"http://h/r"},"compensation":{"url":"http://h/u"}},
              {"name":"ship","action":{"url":"http://h/s"},"reply":"callback"}]}"#,
        )
        .expect("valid");
        let g = mermaid(&def);
        assert_eq!(
            g,
            "flowchart LR\n  start((\"order\"))\n  done((\"done\"))\n  s0[\"reserve\"]\n  \
             s1[\"ship<br/>(waits for reply)\"]\n  start --> s0\n  s0 --> s1\n  s1 --> done\n  \
             s0_undo[\"undo reserve\"]\n  s0 -. compensation .-> s0_undo\n"
        );
    }

    #[test]
    fn concurrent_steps_are_side_by_side() {
        let def = SagaDefinition::from_json(
            br#"{"name":"fan","mode":"concurrent","steps":[
              {"name":"a","action":{"url":"http://h/a"}},{"name":"b","action":{"url":"http://h/b"}}]}"#,
        )
        .expect("valid");
        let g = mermaid(&def);
        assert!(
            g.contains("start --> s0\n  s0 --> done\n  start --> s1\n  s1 --> done\n"),
            "{g}"
        );
    }
}
