//! [`Results`]: the results of a saga's steps that succeeded, by step name.
//!
//! What [`Saga::execute`](crate::Saga::execute) returns and what a step sees
//! in [`StepContext::results`](crate::StepContext::results). It is kept by
//! step index beside the saga's own names rather than as a map with a key
//! string of its own a step: building and dropping such a map (three key
//! strings copied, a B-tree node, the inserts) was about 40 % of a 3-step
//! `Saga::execute` of no-op steps (callgrind, BENCHMARKS.md).

use std::fmt;
use std::ops::Index;
use std::sync::Arc;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

use crate::saga::Names;

/// The results of the steps of one run that succeeded so far, each by its
/// step's name, in step order: py-api-saga's `saga_results`.
///
/// Read it like a JSON object: `results["reserve"]` is that step's result
/// (`Value::Null` when the step has none yet, as with indexing a
/// [`serde_json::Value`], never a panic); [`get`](Results::get) tells a
/// `null` result from no result; [`iter`](Results::iter) visits the steps
/// that have one in step order. It serializes as a JSON object, and
/// [`into_map`](Results::into_map) or `Value::from` give one.
///
/// ```
/// use sagatx::{Saga, StepContext, StepError};
/// use serde_json::json;
///
/// async fn reserve(_: StepContext) -> Result<serde_json::Value, StepError> {
///     Ok(json!({"reservation": "r-1"}))
/// }
/// async fn charge(ctx: StepContext) -> Result<String, StepError> {
///     Ok(format!("paid for {}", ctx.results()["reserve"]["reservation"]))
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let saga = Saga::builder("order").step("reserve", reserve).step("charge", charge).build().unwrap();
/// let results = saga.execute(json!(null)).await.unwrap();
/// assert_eq!(results["charge"], json!("paid for \"r-1\""));
/// assert_eq!(results.keys().collect::<Vec<_>>(), ["reserve", "charge"]);
/// assert_eq!(results.get("ship"), None);
/// assert_eq!(json!(results), json!({"reserve": {"reservation": "r-1"}, "charge": "paid for \"r-1\""}));
/// # });
/// ```
#[derive(Clone)]
pub struct Results {
    /// The saga's names; `values` is indexed like `names.steps`.
    names: Arc<Names>,
    /// Each step's result, by step index; empty until the first one
    /// (a run whose first step fails allocates nothing here).
    values: Vec<Option<Value>>,
    /// How many of `values` are `Some`.
    len: usize,
}

static NULL: Value = Value::Null;

impl Results {
    /// No results yet, for a saga of these names.
    pub(crate) fn new(names: Arc<Names>) -> Self {
        Results {
            names,
            values: Vec::new(),
            len: 0,
        }
    }

    /// The names of the saga these results are for.
    pub(crate) fn names(&self) -> &Names {
        &self.names
    }

    /// Records the result of step `step` (an index of this saga's steps;
    /// one out of range is ignored: the callers pass their own saga's).
    pub(crate) fn insert(&mut self, step: usize, value: Value) {
        let n = self.names.steps.len();
        if step >= n {
            return;
        }
        if self.values.is_empty() {
            self.values = vec![None; n];
        }
        if self.values[step].replace(value).is_none() {
            self.len += 1;
        }
    }

    /// Whether step `step` (an index) has a result.
    pub(crate) fn has(&self, step: usize) -> bool {
        self.values.get(step).is_some_and(Option::is_some)
    }

    /// The result of the step named `step`, or `None` when it has none
    /// (it has not succeeded, or there is no such step).
    pub fn get(&self, step: &str) -> Option<&Value> {
        // A scan, not a hash: sagas have few steps (at most 256), most
        // have a handful, and comparing a few short names is cheaper than
        // hashing one.
        let i = self.names.steps.iter().position(|n| n.as_str() == step)?;
        self.values.get(i)?.as_ref()
    }

    /// Whether the step named `step` has a result.
    pub fn contains_key(&self, step: &str) -> bool {
        self.get(step).is_some()
    }

    /// How many steps have a result.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no step has a result yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Each step that has a result, with it, in step order.
    pub fn iter(&self) -> ResultsIter<'_> {
        ResultsIter {
            names: self.names.steps.iter(),
            values: self.values.iter(),
            left: self.len,
        }
    }

    /// The names of the steps that have a result, in step order.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.iter().map(|(k, _)| k)
    }

    /// The results, in step order.
    pub fn values(&self) -> impl Iterator<Item = &Value> + '_ {
        self.iter().map(|(_, v)| v)
    }

    /// The results as a JSON object (step name → result).
    pub fn to_map(&self) -> Map<String, Value> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.clone()))
            .collect()
    }

    /// The results as a JSON object, without copying the values.
    pub fn into_map(self) -> Map<String, Value> {
        let Results { names, values, .. } = self;
        names
            .steps
            .iter()
            .zip(values)
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v?)))
            .collect()
    }
}

/// The steps that have a result, in step order: see [`Results::iter`].
pub struct ResultsIter<'a> {
    names: std::slice::Iter<'a, sagatx_core::Name>,
    values: std::slice::Iter<'a, Option<Value>>,
    left: usize,
}

impl<'a> Iterator for ResultsIter<'a> {
    type Item = (&'a str, &'a Value);

    fn next(&mut self) -> Option<Self::Item> {
        for (name, value) in (&mut self.names).zip(&mut self.values) {
            if let Some(v) = value {
                self.left -= 1;
                return Some((name.as_str(), v));
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for ResultsIter<'_> {}

impl<'a> IntoIterator for &'a Results {
    type Item = (&'a str, &'a Value);
    type IntoIter = ResultsIter<'a>;
    fn into_iter(self) -> ResultsIter<'a> {
        self.iter()
    }
}

/// `results["step"]`: that step's result, `Value::Null` when it has none
/// (as indexing a `serde_json::Value` does; [`Results::get`] tells the two
/// apart).
impl Index<&str> for Results {
    type Output = Value;
    fn index(&self, step: &str) -> &Value {
        self.get(step).unwrap_or(&NULL)
    }
}

/// Equal when the same steps have equal results (whatever saga they are
/// of).
impl PartialEq for Results {
    fn eq(&self, other: &Results) -> bool {
        self.len == other.len && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl PartialEq<Map<String, Value>> for Results {
    fn eq(&self, other: &Map<String, Value>) -> bool {
        self.len == other.len() && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl fmt::Debug for Results {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// A JSON object, in step order.
impl Serialize for Results {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len))?;
        for (k, v) in self {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl From<Results> for Map<String, Value> {
    fn from(results: Results) -> Self {
        results.into_map()
    }
}

impl From<Results> for Value {
    fn from(results: Results) -> Self {
        Value::Object(results.into_map())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagatx_core::Name;
    use serde_json::json;

    fn names(steps: &[&str]) -> Arc<Names> {
        Arc::new(Names {
            saga: Name::from("s"),
            steps: steps.iter().map(|s| Name::from(*s)).collect(),
        })
    }

    #[test]
    fn reads_like_a_json_object_in_step_order() {
        let mut r = Results::new(names(&["b", "a", "c"]));
        assert!(r.is_empty());
        assert_eq!(r["a"], Value::Null);
        r.insert(2, json!(3));
        r.insert(0, Value::Null);
        assert_eq!(r.len(), 2);
        assert_eq!(r.get("b"), Some(&Value::Null), "a null result is a result");
        assert_eq!(r.get("a"), None);
        assert_eq!(r.get("zzz"), None);
        assert_eq!(r["c"], json!(3));
        assert!(r.contains_key("b") && !r.contains_key("a"));
        assert_eq!(r.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(r.iter().len(), 2);
        assert_eq!(
            serde_json::to_string(&r).expect("serializes"),
            r#"{"b":null,"c":3}"#,
            "serialized in step order"
        );
        assert_eq!(format!("{r:?}"), r#"{"b": Null, "c": Number(3)}"#);
        let map = json!({"c": 3, "b": null});
        assert_eq!(&r, map.as_object().expect("an object"));
        assert_eq!(r.to_map(), *map.as_object().expect("an object"));
        assert_eq!(Value::from(r.clone()), map);
    }

    #[test]
    fn a_result_replaced_counts_once_and_an_index_out_of_range_is_ignored() {
        let mut r = Results::new(names(&["a", "b"]));
        r.insert(1, json!(1));
        r.insert(1, json!(2));
        r.insert(7, json!(3));
        assert_eq!(r.len(), 1);
        assert_eq!(r["b"], json!(2));
        assert!(r.has(1) && !r.has(0) && !r.has(7));
        assert_eq!(
            r.into_map(),
            *json!({"b": 2}).as_object().expect("an object")
        );
    }

    proptest::proptest! {
        /// Against a reference model (a map by name, visited in step
        /// order): whatever results are recorded, in whatever order, the
        /// reads, the iteration, the JSON and the map agree with it.
        #[test]
        fn reads_as_the_map_of_what_was_recorded(
            steps in 1usize..12,
            inserts in proptest::collection::vec((0usize..14, 0i64..5), 0..20),
        ) {
            let names: Vec<String> = (0..steps).map(|i| format!("s{i}")).collect();
            let mut r = Results::new(Arc::new(Names {
                saga: Name::from("p"),
                steps: names.iter().map(|n| Name::from(n.as_str())).collect(),
            }));
            let mut model: std::collections::BTreeMap<usize, Value> = Default::default();
            for (i, v) in inserts {
                r.insert(i, json!(v));
                if i < steps {
                    model.insert(i, json!(v));
                }
            }
            proptest::prop_assert_eq!(r.len(), model.len());
            proptest::prop_assert_eq!(r.is_empty(), model.is_empty());
            for (i, name) in names.iter().enumerate() {
                proptest::prop_assert_eq!(r.get(name), model.get(&i));
                proptest::prop_assert_eq!(&r[name.as_str()], model.get(&i).unwrap_or(&Value::Null));
            }
            let in_order: Vec<(String, Value)> =
                model.iter().map(|(i, v)| (names[*i].clone(), v.clone())).collect();
            let seen: Vec<(String, Value)> =
                r.iter().map(|(k, v)| (k.to_owned(), v.clone())).collect();
            proptest::prop_assert_eq!(&seen, &in_order);
            proptest::prop_assert_eq!(r.iter().len(), model.len());
            let map: Map<String, Value> = in_order.into_iter().collect();
            proptest::prop_assert_eq!(serde_json::to_value(&r).expect("serializes"), Value::Object(map.clone()));
            proptest::prop_assert_eq!(&r, &map);
            proptest::prop_assert_eq!(r.into_map(), map);
        }
    }

    #[test]
    fn equal_when_the_same_steps_have_equal_results() {
        let mut a = Results::new(names(&["x", "y"]));
        let mut b = Results::new(names(&["y", "x", "z"]));
        assert_eq!(a, b);
        a.insert(0, json!(1));
        assert_ne!(a, b);
        b.insert(1, json!(1));
        assert_eq!(a, b);
        a.insert(1, json!(2));
        b.insert(0, json!(2));
        // The same pairs, in another step order.
        assert_eq!(a, b);
        assert_eq!(a, b.to_map());
        b.insert(2, json!(3));
        assert_ne!(a, b);
    }
}
