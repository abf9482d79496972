//! Reading the replies of the store's scripts and commands: a reply that is not what
//! the script returns is `StoreError::Corrupt`.

use redis::Value;

use crate::job::{JobSpec, Phase};
use crate::store::{StoreError, StoreResult};

pub(super) fn phase_of(v: &[u8]) -> Option<Phase> {
    match v {
        b"q" => Some(Phase::Queued),
        b"r" => Some(Phase::Running),
        b"c" => Some(Phase::Completed),
        _ => None,
    }
}

pub(super) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("redis data: {what}"))
}

/// A reply value as bytes (`None` for nil).
pub(super) fn bytes_of(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

pub(super) fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.trim().parse().ok(),
        Value::SimpleString(s) => s.trim().parse().ok(),
        Value::Double(d) => Some(*d as i64),
        _ => None,
    }
}

pub(super) fn num<T: TryFrom<i64>>(v: Option<&Value>, what: &str) -> StoreResult<T> {
    v.and_then(int_of)
        .and_then(|i| T::try_from(i).ok())
        .ok_or_else(|| corrupt(format!("{what} is not a number")))
}

pub(super) fn array(v: Value) -> StoreResult<Vec<Value>> {
    match v {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(corrupt(format!("unexpected reply {other:?}"))),
    }
}

pub(super) fn text(v: Option<&Value>, what: &str) -> StoreResult<String> {
    v.and_then(bytes_of)
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| corrupt(format!("{what} is missing")))
}

pub(super) fn parse_spec(v: Option<&Value>) -> StoreResult<JobSpec> {
    let raw = v
        .and_then(bytes_of)
        .ok_or_else(|| corrupt("job spec is missing"))?;
    serde_json::from_slice(&raw).map_err(|e| corrupt(format!("job spec: {e}")))
}
