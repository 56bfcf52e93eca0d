//! The admin listener and the server skeleton: health, readiness, metrics after a request,
//! unknown routes. Probe semantics in outages and at start: `probes.rs`.

use crate::helpers::*;

#[tokio::test]
async fn health_and_readiness_answer_200_with_a_database() {
    let app = spawn_app().await;
    let h = app
        .http
        .get(app.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    let r = app.http.get(app.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn metrics_count_requests_by_route_name() {
    let app = spawn_app().await;
    let _ = app.get("/o/not-a-token.gif", Some(BROWSER_UA)).await;
    let _ = app.get("/nowhere", None).await;
    let text = app.metrics_text().await;
    assert_eq!(
        metric_value(
            &text,
            r#"reachly_http_requests_total{route="pixel",status="200"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            r#"reachly_http_requests_total{route="not_found",status="404"}"#
        ),
        1.0
    );
    assert!(
        text.contains(r#"reachly_http_request_duration_seconds_bucket{route="pixel""#),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, r#"reachly_invalid_tokens_total{purpose="open"}"#),
        1.0
    );
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let app = spawn_app().await;
    assert_eq!(app.get("/", None).await.status(), 404);
    assert_eq!(
        app.get("/metrics", None).await.status(),
        404,
        "metrics are not on the public listener"
    );
    let r = app.http.delete(app.url("/c/abc")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    assert_eq!(
        app.http
            .get(app.admin_url("/o/x.gif"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let unconfigured = app.post_webhook("sendgrid", &[], "[]").await;
    assert_eq!(
        unconfigured.status(),
        404,
        "a provider with no secret answers 404"
    );
}
