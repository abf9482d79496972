//! "Does the live object already hold everything we would apply?" Lets the reconcile
//! skip writes when nothing changed, while still repairing drift in fields we own.

use serde_json::Value;

/// True when every field set in `desired` has the same value in `live`.
///
/// Fields only the apiserver or other managers set (defaults, status, `replicas`) are
/// ignored. Lists compare element by element and must have the same length. An empty
/// list or map in `desired` matches a missing field: the apiserver drops them.
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(want), Value::Object(have)) => {
            want.iter().all(|(key, want)| match have.get(key) {
                Some(have) => is_subset(want, have),
                None => is_empty(want),
            })
        }
        (Value::Array(want), Value::Array(have)) => {
            want.len() == have.len() && want.iter().zip(have).all(|(w, h)| is_subset(w, h))
        }
        (want, Value::Null) => is_empty(want),
        (want, have) => want == have,
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extra_live_fields_are_fine() {
        let want = json!({"spec": {"template": {"containers": [{"name": "a", "image": "x"}]}}});
        let have = json!({"spec": {"replicas": 3, "template": {"containers": [
            {"name": "a", "image": "x", "imagePullPolicy": "IfNotPresent"}]}}, "status": {}});
        assert!(is_subset(&want, &have));
    }

    #[test]
    fn changed_or_missing_fields_are_differences() {
        let have = json!({"spec": {"containers": [{"name": "a", "image": "x"}]}});
        assert!(!is_subset(
            &json!({"spec": {"containers": [{"name": "a", "image": "y"}]}}),
            &have
        ));
        assert!(!is_subset(&json!({"spec": {"paused": true}}), &have));
        assert!(!is_subset(
            &json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}}),
            &have
        ));
    }

    #[test]
    fn empty_desired_collections_match_missing_fields() {
        let have = json!({"metadata": {"name": "a"}});
        assert!(is_subset(
            &json!({"metadata": {"annotations": {}, "finalizers": []}}),
            &have
        ));
        assert!(!is_subset(
            &json!({"metadata": {"annotations": {"k": "v"}}}),
            &have
        ));
    }
}
