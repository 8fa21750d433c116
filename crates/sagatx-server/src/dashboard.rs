//! The dashboard of API.md §6: a page served from the binary (no CDN), the
//! store's summary, and the saga diagram drawn by the server as SVG.

use sagatx_core::{Mode, ReplyMode, SagaDefinition};

/// The page: HTML, CSS and script in one file, compiled in.
pub const PAGE: &str = include_str!("../assets/dashboard.html");

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const W: i32 = 150;
const H: i32 = 40;
const GAP: i32 = 50;

fn node(out: &mut String, x: i32, y: i32, label: &str, class: &str) {
    out.push_str(&format!(
        r#"<g class="{class}"><rect x="{x}" y="{y}" width="{W}" height="{H}" rx="6"/><text x="{}" y="{}">{}</text></g>"#,
        x + W / 2,
        y + H / 2 + 5,
        esc(label)
    ));
}

fn line(out: &mut String, x1: i32, y1: i32, x2: i32, y2: i32, class: &str) {
    out.push_str(&format!(
        r#"<line class="{class}" x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" marker-end="url(#arrow)"/>"#
    ));
}

/// The saga as SVG: sequential steps in a row, concurrent steps side by
/// side (stacked), each compensation in a dashed box under (or beside) its
/// step, confirms marked.
pub fn diagram(def: &SagaDefinition) -> String {
    let n = def.steps.len() as i32;
    let mut body = String::new();
    let label = |i: usize| {
        let s = &def.steps[i];
        let mut l = s.name.clone();
        if s.reply == ReplyMode::Callback {
            l.push_str(" ⟲");
        }
        if s.confirm.is_some() {
            l.push_str(" ✓");
        }
        l
    };
    let (width, height) = match def.mode {
        Mode::Sequential => {
            for i in 0..def.steps.len() {
                let x = 20 + i as i32 * (W + GAP);
                node(&mut body, x, 20, &label(i), "step");
                if i > 0 {
                    line(&mut body, x - GAP, 20 + H / 2, x - 4, 20 + H / 2, "flow");
                }
                if def.steps[i].compensation.is_some() {
                    node(
                        &mut body,
                        x,
                        20 + H + 40,
                        &format!("undo {}", def.steps[i].name),
                        "undo",
                    );
                    line(
                        &mut body,
                        x + W / 2,
                        20 + H,
                        x + W / 2,
                        20 + H + 36,
                        "undo-link",
                    );
                }
            }
            (40 + n * (W + GAP) - GAP, 20 + 2 * H + 60)
        }
        Mode::Concurrent => {
            for i in 0..def.steps.len() {
                let y = 20 + i as i32 * (H + 20);
                node(&mut body, 20, y, &label(i), "step");
                if def.steps[i].compensation.is_some() {
                    node(
                        &mut body,
                        20 + W + GAP,
                        y,
                        &format!("undo {}", def.steps[i].name),
                        "undo",
                    );
                    line(
                        &mut body,
                        20 + W,
                        y + H / 2,
                        20 + W + GAP - 4,
                        y + H / 2,
                        "undo-link",
                    );
                }
            }
            (40 + 2 * W + GAP, 40 + n * (H + 20) - 20)
        }
    };
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="saga {name}">
<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>
<style>rect{{fill:#eef4ff;stroke:#3b6fd8}} .undo rect{{fill:#fff7ee;stroke:#d8843b;stroke-dasharray:4 3}} text{{font:13px sans-serif;text-anchor:middle}} line{{stroke:#555}} .undo-link{{stroke-dasharray:4 3}}</style>
{body}</svg>"##,
        name = esc(&def.name)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diagram_shows_steps_compensations_and_marks() {
        let def = SagaDefinition::from_json(
            br#"{"name":"order","steps":[
              {"name":"reserve","action":{"url":"http://h/r"},"compensation":{"url":"http://h/u"}},
              {"name":"ship<1>","action":{"url":"http://h/s"},"reply":"callback","confirm":{"url":"http://h/c"}}]}"#,
        );
        // Step names cannot hold '<'; use a valid one and check escaping on the saga name path.
        assert!(def.is_err());
        let def = SagaDefinition::from_json(
            br#"{"name":"order","steps":[
              {"name":"reserve","action":{"url":"http://h/r"},"compensation":{"url":"http://h/u"}},
              {"name":"ship","action":{"url":"http://h/s"},"reply":"callback","confirm":{"url":"http://h/c"}}]}"#,
        )
        .expect("valid");
        let svg = diagram(&def);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains(">reserve</text>"));
        assert!(svg.contains(">undo reserve</text>"));
        assert!(svg.contains(">ship ⟲ ✓</text>"));
        assert_eq!(svg.matches("class=\"undo\"").count(), 1);
        assert_eq!(
            svg.matches("class=\"flow\"").count(),
            1,
            "one arrow between two steps"
        );
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(esc("a<b&\"c\">"), "a&lt;b&amp;&quot;c&quot;&gt;");
    }
}
