//! Proptest generators shared by the property tests of the crates that parse untrusted JSON (the
//! manifest here, the server's OpenAI requests in `runtime`). Behind the `testing` feature: only
//! test builds pull proptest in.

use proptest::prelude::*;
use serde_json::Value;

/// Any JSON value, nested a few levels, with the awkward numbers and strings parsers trip on.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop_oneof![Just(0i64), Just(-1), Just(i64::MAX), Just(i64::MIN), any::<i64>()].prop_map(Value::from),
        prop_oneof![Just(1e-40f64), Just(1e300), Just(-0.0), any::<f64>().prop_filter("finite", |f| f.is_finite())]
            .prop_map(Value::from),
        prop_oneof![
            Just(String::new()),
            Just("data:image/png;base64,@@".to_string()),
            Just("<image>".to_string()),
            ".{0,12}"
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("role".to_string()),
                    Just("content".to_string()),
                    Just("type".to_string()),
                    Just("text".to_string()),
                    Just("image_url".to_string()),
                    Just("url".to_string()),
                    "[a-z_]{1,8}"
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `base` with the values at some of its JSON pointers replaced by arbitrary values.
pub fn mutated(base: Value, pointers: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop::collection::vec((0..pointers.len(), json_value()), 1..4).prop_map(move |edits| {
        let mut v = base.clone();
        for (i, x) in edits {
            if let Some(slot) = v.pointer_mut(pointers[i]) {
                *slot = x;
            }
        }
        v
    })
}
