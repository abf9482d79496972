//! NetworkPolicy scenarios: a drifted policy is put back; with policies off the one
//! the function owns is deleted and anyone else's is left alone.

use super::*;

#[tokio::test]
async fn drifted_network_policy_is_repaired() {
    let ff = steady_function();
    let (deployment, service) = (live_deployment(&ff, 1, 1), live_service(&ff));
    let mut policy = live_policy(&ff);
    // Someone opened the pods to every namespace.
    policy["spec"]["ingress"][0]["from"] = json!([{"namespaceSelector": {}}]);
    let want = desired_policy(&ff);
    let calls = vec![
        Call::new(http::Method::GET, DEPLOYMENT, move |_| {
            (StatusCode::OK, deployment)
        }),
        Call::new(http::Method::GET, SERVICE, move |_| {
            (StatusCode::OK, service)
        }),
        Call::new(http::Method::GET, POLICY, move |_| (StatusCode::OK, policy)),
        Call::new(
            http::Method::PATCH,
            format!("{POLICY}{APPLY}"),
            move |body| {
                assert_eq!(body, want);
                (StatusCode::OK, body)
            },
        ),
        Call::new(http::Method::POST, format!("{EVENTS}?"), |body| {
            assert_eq!(body["note"], "applied changes to NetworkPolicy app");
            event_reply(body)
        }),
    ];
    let (result, _, metrics) = harness(MachineCatalog::builtin(), calls)
        .reconcile(ff)
        .await;
    result.unwrap();
    let writes = |w: &str| metrics.writes.with_label_values(&[w]).get();
    assert_eq!(writes("apply_network_policy"), 1);
    assert_eq!(writes("apply_deployment") + writes("apply_service"), 0);
}

fn policies_off() -> OperatorConfig {
    OperatorConfig {
        network_policy: None,
        ..OperatorConfig::default()
    }
}

#[tokio::test]
async fn policies_off_delete_the_one_the_function_owns() {
    let ff = steady_function();
    let (deployment, service) = (live_deployment(&ff, 1, 1), live_service(&ff));
    let policy = live_policy(&ff);
    let calls = vec![
        Call::new(http::Method::GET, DEPLOYMENT, move |_| {
            (StatusCode::OK, deployment)
        }),
        Call::new(http::Method::GET, SERVICE, move |_| {
            (StatusCode::OK, service)
        }),
        Call::new(http::Method::GET, POLICY, move |_| (StatusCode::OK, policy)),
        Call::new(http::Method::DELETE, format!("{POLICY}?"), |_| {
            (
                StatusCode::OK,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            )
        }),
        Call::new(http::Method::POST, format!("{EVENTS}?"), |body| {
            assert_eq!(body["reason"], "Updated");
            assert_eq!(
                body["note"],
                "deleted NetworkPolicy app: network policies are off (--network-policy=false)"
            );
            event_reply(body)
        }),
    ];
    let (result, _, metrics) = harness_with(MachineCatalog::builtin(), policies_off(), calls)
        .reconcile(ff)
        .await;
    result.unwrap();
    let deletes = metrics.writes.with_label_values(&["delete_network_policy"]);
    assert_eq!(deletes.get(), 1);
}

#[tokio::test]
async fn policies_off_leave_other_policies_alone() {
    for owner in [None, Some("someone-elses-uid")] {
        let ff = steady_function();
        let (deployment, service) = (live_deployment(&ff, 1, 1), live_service(&ff));
        // A policy of the same name the function does not control (the user's own).
        let mut policy = live_policy(&ff);
        match owner {
            None => {
                let meta = policy["metadata"].as_object_mut().unwrap();
                meta.remove("ownerReferences");
            }
            Some(uid) => policy["metadata"]["ownerReferences"][0]["uid"] = json!(uid),
        }
        let calls = vec![
            Call::new(http::Method::GET, DEPLOYMENT, move |_| {
                (StatusCode::OK, deployment)
            }),
            Call::new(http::Method::GET, SERVICE, move |_| {
                (StatusCode::OK, service)
            }),
            Call::new(http::Method::GET, POLICY, move |_| (StatusCode::OK, policy)),
        ];
        let (result, seen, _) = harness_with(MachineCatalog::builtin(), policies_off(), calls)
            .reconcile(ff)
            .await;
        result.unwrap();
        assert_eq!(seen.len(), 3, "only reads: {seen:?}");
    }
}

#[tokio::test]
async fn policies_off_and_none_there_only_read() {
    let ff = steady_function();
    let (deployment, service) = (live_deployment(&ff, 1, 1), live_service(&ff));
    let calls = vec![
        Call::new(http::Method::GET, DEPLOYMENT, move |_| {
            (StatusCode::OK, deployment)
        }),
        Call::new(http::Method::GET, SERVICE, move |_| {
            (StatusCode::OK, service)
        }),
        Call::new(http::Method::GET, POLICY, |_| not_found()),
    ];
    let (result, seen, _) = harness_with(MachineCatalog::builtin(), policies_off(), calls)
        .reconcile(ff)
        .await;
    result.unwrap();
    assert_eq!(seen.len(), 3);
}

#[test]
fn event_notes_list_kinds_in_english() {
    assert_eq!(and_list(&[]), "");
    assert_eq!(and_list(&["Service"]), "Service");
    assert_eq!(
        and_list(&["Deployment", "Service"]),
        "Deployment and Service"
    );
    assert_eq!(
        and_list(&["Deployment", "Service", "NetworkPolicy"]),
        "Deployment, Service and NetworkPolicy"
    );
}
