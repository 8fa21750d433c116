//! Saga definitions: what the steps are, how they are called and retried.
//!
//! A definition is data. The coordinator reads it from JSON (API.md §1); the
//! Rust builder of the `sagatx` crate makes one whose endpoints are
//! [`Endpoint::Local`], handled by functions registered in the engine.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::retry::{RetryOverride, RetryPolicy};

/// At most this many steps in one saga.
pub const MAX_STEPS: usize = 256;
/// Names are at most this long.
pub const MAX_NAME_LEN: usize = 64;
/// Default per-attempt timeout of a `sync` step.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Timeouts above this are rejected (30 days).
pub const MAX_TIMEOUT_MS: u64 = 30 * 86_400_000;

/// How the actions of a saga are run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One after the other; on failure, the done ones are undone in reverse.
    #[default]
    Sequential,
    /// All actions start together; on failure, the done ones are undone together.
    Concurrent,
}

/// What the outcome of an action call is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyMode {
    /// The call's own response is the outcome.
    #[default]
    Sync,
    /// A success only means "accepted"; the outcome arrives later as a reply.
    Callback,
}

/// Which of a step's three calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Action,
    Compensation,
    Confirm,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Action => "action",
            Phase::Compensation => "compensation",
            Phase::Confirm => "confirm",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An HTTP call made by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpEndpoint {
    pub url: String,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

fn default_method() -> String {
    "POST".to_string()
}

/// Where a call goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// An HTTP call (the coordinator's steps).
    Http(HttpEndpoint),
    /// A function registered in the engine under the saga's and step's name
    /// (the Rust library's steps). Written `"local"` in JSON.
    Local,
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Endpoint::Http(h) => h.serialize(s),
            Endpoint::Local => s.serialize_str("local"),
        }
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Endpoint;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"an object {"url": ..., "method": ..., "headers": {...}}"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Endpoint, E> {
                if v == "local" {
                    Ok(Endpoint::Local)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Endpoint, A::Error> {
                HttpEndpoint::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(Endpoint::Http)
            }
        }
        d.deserialize_any(V)
    }
}

/// One step of a saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDefinition {
    pub name: String,
    pub action: Endpoint,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm: Option<Endpoint>,
    #[serde(default)]
    pub reply: ReplyMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(
        default,
        deserialize_with = "object",
        skip_serializing_if = "RetryOverride::is_empty"
    )]
    pub retry: RetryOverride,
}

impl StepDefinition {
    /// A step whose calls are all local functions.
    pub fn local(name: impl Into<String>) -> Self {
        StepDefinition {
            name: name.into(),
            action: Endpoint::Local,
            compensation: None,
            confirm: None,
            reply: ReplyMode::Sync,
            timeout_ms: None,
            retry: RetryOverride::default(),
        }
    }

    pub fn endpoint(&self, phase: Phase) -> Option<&Endpoint> {
        match phase {
            Phase::Action => Some(&self.action),
            Phase::Compensation => self.compensation.as_ref(),
            Phase::Confirm => self.confirm.as_ref(),
        }
    }
}

/// A saga: its name, its steps and how they run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagaDefinition {
    pub name: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "yes")]
    pub autocommit: bool,
    #[serde(
        default,
        deserialize_with = "object",
        skip_serializing_if = "RetryOverride::is_empty"
    )]
    pub retry: RetryOverride,
    #[serde(deserialize_with = "steps")]
    pub steps: Vec<StepDefinition>,
}

fn yes() -> bool {
    true
}

/// Reads a `T` from a JSON object only. serde's derive also reads a
/// struct from an array, its fields in order (`"retry": [5]` would be
/// `max_attempts: 5`), which no definition means.
fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    struct Object<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Object<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_map(Object(std::marker::PhantomData))
}

/// A definition's steps, each read as by [`object`].
fn steps<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<StepDefinition>, D::Error> {
    struct Step(StepDefinition);
    impl<'de> Deserialize<'de> for Step {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            object(d).map(Step)
        }
    }
    Ok(Vec::<Step>::deserialize(d)?
        .into_iter()
        .map(|s| s.0)
        .collect())
}

/// Why a definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DefinitionError {
    /// Not JSON at all (HTTP 400).
    #[error("malformed JSON at line {line}, column {column}: {message}")]
    Malformed {
        line: usize,
        column: usize,
        message: String,
    },
    /// Well-formed but not a valid definition (HTTP 422); `field` is a path
    /// such as `steps[1].action.url`.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl DefinitionError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        DefinitionError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Checks a saga or step name: 1–64 characters of `a-z 0-9 _ . -`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

const NAME_RULE: &str = "must be 1 to 64 characters of a-z 0-9 _ . -";

fn check_url(url: &str) -> Result<(), &'static str> {
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if let Some(r) = url.strip_prefix("https://") {
        r
    } else {
        return Err("must be an http:// or https:// URL");
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err("must name a host, as in http://127.0.0.1:9001/reserve");
    }
    if url.len() > 2048 {
        return Err("must be at most 2048 characters");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters");
    }
    Ok(())
}

fn check_endpoint(field: &str, e: &Endpoint) -> Result<(), DefinitionError> {
    let Endpoint::Http(h) = e else { return Ok(()) };
    check_url(&h.url).map_err(|m| DefinitionError::invalid(format!("{field}.url"), m))?;
    const METHODS: [&str; 5] = ["POST", "PUT", "PATCH", "DELETE", "GET"];
    if !METHODS.contains(&h.method.as_str()) {
        return Err(DefinitionError::invalid(
            format!("{field}.method"),
            "must be one of POST, PUT, PATCH, DELETE, GET",
        ));
    }
    for (k, v) in &h.headers {
        let ok_name = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !ok_name {
            return Err(DefinitionError::invalid(
                format!("{field}.headers.{k}"),
                "is not a valid HTTP header name",
            ));
        }
        if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(DefinitionError::invalid(
                format!("{field}.headers.{k}"),
                "must not contain line breaks",
            ));
        }
    }
    Ok(())
}

impl SagaDefinition {
    /// Parses and validates a definition from JSON bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, DefinitionError> {
        // serde would read a struct from an array too; a definition is an
        // object. (Malformed input still gets its line and column below.)
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if matches!(
            first,
            Some(b'[' | b'"' | b't' | b'f' | b'n' | b'-' | b'0'..=b'9')
        ) && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
        {
            return Err(DefinitionError::invalid(
                "definition",
                "must be a JSON object",
            ));
        }
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let def: SagaDefinition = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                DefinitionError::Malformed {
                    line: inner.line(),
                    column: inner.column(),
                    message: strip_position(&inner.to_string()),
                }
            } else {
                let message = strip_position(&inner.to_string());
                DefinitionError::invalid(field_path(&path, &message, "definition"), message)
            }
        })?;
        def.validate()?;
        Ok(def)
    }

    /// Parses and validates a definition from a JSON value (an inline one).
    pub fn from_value(value: &serde_json::Value) -> Result<Self, DefinitionError> {
        if !value.is_object() {
            return Err(DefinitionError::invalid("saga", "must be a JSON object"));
        }
        let def: SagaDefinition = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let message = strip_position(&e.into_inner().to_string());
            DefinitionError::invalid(field_path(&path, &message, "saga"), message)
        })?;
        def.validate()?;
        Ok(def)
    }

    /// The canonical JSON form: defaults written out, used for storage and
    /// for "equal as JSON" comparison of versions.
    pub fn to_json(&self) -> serde_json::Value {
        // A definition holds only strings, numbers, booleans and maps with
        // string keys, so serialising it cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Checks every rule of API.md §1; the error names the offending field.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        if !valid_name(&self.name) {
            return Err(DefinitionError::invalid("name", NAME_RULE));
        }
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return Err(DefinitionError::invalid(
                "steps",
                format!(
                    "must hold 1 to {MAX_STEPS} steps, found {}",
                    self.steps.len()
                ),
            ));
        }
        let saga_policy = self.retry.apply(RetryPolicy::default());
        saga_policy
            .validate()
            .map_err(|(f, m)| DefinitionError::invalid(format!("retry.{f}"), m))?;
        let mut seen = std::collections::HashSet::new();
        for (i, s) in self.steps.iter().enumerate() {
            let at = format!("steps[{i}]");
            if !valid_name(&s.name) {
                return Err(DefinitionError::invalid(format!("{at}.name"), NAME_RULE));
            }
            if !seen.insert(s.name.as_str()) {
                return Err(DefinitionError::invalid(
                    format!("{at}.name"),
                    format!("duplicate step name {:?}", s.name),
                ));
            }
            check_endpoint(&format!("{at}.action"), &s.action)?;
            if let Some(c) = &s.compensation {
                check_endpoint(&format!("{at}.compensation"), c)?;
            }
            if let Some(c) = &s.confirm {
                check_endpoint(&format!("{at}.confirm"), c)?;
            }
            if let Some(t) = s.timeout_ms {
                if t == 0 || t > MAX_TIMEOUT_MS {
                    return Err(DefinitionError::invalid(
                        format!("{at}.timeout_ms"),
                        format!("must be between 1 and {MAX_TIMEOUT_MS}"),
                    ));
                }
            }
            s.retry
                .apply(saga_policy)
                .validate()
                .map_err(|(f, m)| DefinitionError::invalid(format!("{at}.retry.{f}"), m))?;
        }
        Ok(())
    }

    /// The retry policy of step `i`'s action.
    pub fn action_policy(&self, i: usize) -> RetryPolicy {
        let saga = self.retry.apply(RetryPolicy::default());
        match self.steps.get(i) {
            Some(s) => s.retry.apply(saga),
            None => saga,
        }
    }

    /// The retry policy of a phase of step `i`.
    pub fn policy(&self, i: usize, phase: Phase) -> RetryPolicy {
        match phase {
            Phase::Action => self.action_policy(i),
            Phase::Compensation | Phase::Confirm => self.action_policy(i).for_undo(),
        }
    }

    /// The per-attempt timeout of a call, `None` for no limit. For a
    /// `callback` action this is the wait for the reply, not the call.
    pub fn attempt_timeout_ms(&self, i: usize, phase: Phase) -> Option<u64> {
        let s = self.steps.get(i)?;
        match (phase, s.reply) {
            (Phase::Action, ReplyMode::Callback) => Some(DEFAULT_TIMEOUT_MS),
            _ => Some(s.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS)),
        }
    }

    /// How long a `callback` step waits for its reply, if bounded.
    pub fn reply_timeout_ms(&self, i: usize) -> Option<u64> {
        let s = self.steps.get(i)?;
        match s.reply {
            ReplyMode::Callback => s.timeout_ms,
            ReplyMode::Sync => None,
        }
    }

    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
}

/// The path of the offending field; for an unknown field, serde reports the
/// object that holds it, so the field's own name is appended.
fn field_path(path: &str, message: &str, root: &str) -> String {
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next());
    match (path, unknown) {
        (".", Some(f)) => f.to_string(),
        (".", None) => root.to_string(),
        (p, Some(f)) if !p.ends_with(f) => format!("{p}.{f}"),
        (p, _) => p.to_string(),
    }
}

/// serde_json appends " at line L column C" to its messages; the path and
/// position are reported separately, so drop it.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{
      "name": "order",
      "mode": "sequential",
      "autocommit": true,
      "retry": {"max_attempts": 3, "initial_backoff_ms": 100, "max_backoff_ms": 30000, "multiplier": 2.0},
      "steps": [
        {
          "name": "reserve",
          "action":       {"url": "http://127.0.0.1:9001/reserve", "method": "POST", "headers": {}},
          "compensation": {"url": "http://127.0.0.1:9001/release"},
          "confirm":      {"url": "http://127.0.0.1:9001/confirm"},
          "reply": "sync",
          "timeout_ms": 10000,
          "retry": {"max_attempts": 5}
        }
      ]
    }"#;

    fn field_of(json: &str) -> String {
        match SagaDefinition::from_json(json.as_bytes()) {
            Err(DefinitionError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid definition, got {other:?}"),
        }
    }

    #[test]
    fn parses_the_api_example() {
        let d = SagaDefinition::from_json(EXAMPLE.as_bytes()).expect("valid");
        assert_eq!(d.name, "order");
        assert_eq!(d.steps.len(), 1);
        assert_eq!(d.action_policy(0).max_attempts, 5);
        assert_eq!(d.policy(0, Phase::Compensation).max_attempts, 10);
        let Endpoint::Http(h) = &d.steps[0].compensation.as_ref().expect("set") else {
            panic!("http endpoint expected")
        };
        assert_eq!(h.method, "POST");
        // The canonical form parses back to the same definition.
        let again = SagaDefinition::from_value(&d.to_json()).expect("round trip");
        assert_eq!(again, d);
    }

    #[test]
    fn defaults_apply() {
        let d = SagaDefinition::from_json(
            br#"{"name":"a","steps":[{"name":"s","action":{"url":"http://h/x"}}]}"#,
        )
        .expect("valid");
        assert_eq!(d.mode, Mode::Sequential);
        assert!(d.autocommit);
        assert_eq!(d.steps[0].reply, ReplyMode::Sync);
        assert_eq!(d.action_policy(0), RetryPolicy::default());
        assert_eq!(d.attempt_timeout_ms(0, Phase::Action), Some(10_000));
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        match SagaDefinition::from_json(b"{\n  \"name\": \"a\",\n  oops\n}") {
            Err(DefinitionError::Malformed { line, column, .. }) => {
                assert_eq!(line, 3);
                assert_eq!(column, 3);
            }
            other => panic!("expected malformed, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_offending_field() {
        let step = |s: &str| format!(r#"{{"name":"a","steps":[{s}]}}"#);
        assert_eq!(field_of(r#"{"name":"A","steps":[]}"#), "name");
        assert_eq!(field_of(r#"{"name":"a","steps":[]}"#), "steps");
        assert_eq!(field_of(r#"{"name":"a","stepz":[],"steps":[]}"#), "stepz");
        assert_eq!(
            field_of(&step(r#"{"name":"s","action":{"url":"ftp://x"}}"#)),
            "steps[0].action.url"
        );
        assert_eq!(
            field_of(&step(
                r#"{"name":"s","action":{"url":"http://x","verb":"POST"}}"#
            )),
            "steps[0].action.verb"
        );
        assert_eq!(
            field_of(&step(
                r#"{"name":"s","action":{"url":"http://x","method":"BREW"}}"#
            )),
            "steps[0].action.method"
        );
        assert_eq!(
            field_of(&step(
                r#"{"name":"s","action":{"url":"http://x"},"timeout_ms":"ten"}"#
            )),
            "steps[0].timeout_ms"
        );
        assert_eq!(
            field_of(&step(
                r#"{"name":"s","action":{"url":"http://x"},"retry":{"max_attempts":0}}"#
            )),
            "steps[0].retry.max_attempts"
        );
        assert_eq!(
            field_of(
                r#"{"name":"a","steps":[{"name":"s","action":{"url":"http://x"}},{"name":"s","action":{"url":"http://x"}}]}"#
            ),
            "steps[1].name"
        );
        assert_eq!(
            field_of(&step(
                r#"{"name":"s","action":{"url":"http://x"},"reply":"later"}"#
            )),
            "steps[0].reply"
        );
        assert_eq!(
            field_of(r#"{"name":"a","mode":"parallel","steps":[]}"#),
            "mode"
        );
    }

    /// serde's derive reads a struct from an array too, field by field in
    /// order; a definition's objects are objects only, from JSON bytes and
    /// from a JSON value (an inline definition) alike.
    #[test]
    fn arrays_in_place_of_objects_are_refused() {
        let ok = r#"{"name":"s","action":{"url":"http://x"}}"#;
        let cases = [
            (
                format!(r#"{{"name":"a","steps":[{ok}],"retry":[5]}}"#),
                "retry",
            ),
            (
                r#"{"name":"a","steps":[{"name":"s","action":{"url":"http://x"},"retry":[5,100]}]}"#
                    .to_string(),
                "steps[0].retry",
            ),
            (
                format!(r#"{{"name":"a","steps":[{ok},["t",{{"url":"http://x"}}]]}}"#),
                "steps[1]",
            ),
        ];
        for (json, field) in cases {
            assert_eq!(field_of(&json), field, "{json}");
            let value: serde_json::Value = serde_json::from_str(&json).expect("JSON");
            match SagaDefinition::from_value(&value) {
                Err(DefinitionError::Invalid { field: f, message }) => {
                    assert_eq!(f, field, "{json}");
                    assert!(message.contains("expected an object"), "{message}");
                }
                other => panic!("expected an invalid definition, got {other:?}"),
            }
        }
        // Objects there still read as before.
        let d = SagaDefinition::from_json(
            br#"{"name":"a","retry":{"max_attempts":4},"steps":[{"name":"s","action":{"url":"http://x"},"retry":{"max_attempts":2}}]}"#,
        )
        .expect("valid");
        assert_eq!(d.retry.max_attempts, Some(4));
        assert_eq!(d.action_policy(0).max_attempts, 2);
    }

    #[test]
    fn too_many_steps_are_refused() {
        let steps: Vec<String> = (0..257)
            .map(|i| format!(r#"{{"name":"s{i}","action":"local"}}"#))
            .collect();
        let json = format!(r#"{{"name":"a","steps":[{}]}}"#, steps.join(","));
        assert_eq!(field_of(&json), "steps");
    }

    #[test]
    fn names_follow_the_rule() {
        assert!(valid_name("order.v2-a_b"));
        assert!(!valid_name(""));
        assert!(!valid_name("Order"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"a".repeat(65)));
        assert!(valid_name(&"a".repeat(64)));
    }
}
