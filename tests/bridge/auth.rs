//! Authentication before the upgrade, and entitlements after it.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, http::HeaderValue};

use crate::support::*;

const SECRET: &str = "a-test-secret-of-32-bytes-length";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn hs256(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// Opens `/ws/{code}` with `token` in the Authorization header; Ok(welcome)
/// or Err(HTTP status).
async fn open_with_header(app: &TestApp, code: &str, token: &str) -> Result<(Socket, Value), u16> {
    let mut request = app.ws_url(code).into_client_request().expect("request");
    let bearer = HeaderValue::from_str(&format!("Bearer {token}")).expect("header value");
    request.headers_mut().insert("Authorization", bearer);
    finish(tokio_tungstenite::connect_async(request).await).await
}

/// Opens `/ws/{code}?token=...` (as a browser would).
async fn open_with_query(
    app: &TestApp,
    code: &str,
    token: Option<&str>,
) -> Result<(Socket, Value), u16> {
    let url = match token {
        Some(token) => format!("{}?token={token}", app.ws_url(code)),
        None => app.ws_url(code),
    };
    finish(tokio_tungstenite::connect_async(url).await).await
}

async fn finish<R>(
    result: Result<(Socket, R), tungstenite::Error>,
) -> Result<(Socket, Value), u16> {
    match result {
        Ok((mut socket, _)) => {
            let welcome = next_json(&mut socket).await;
            Ok((socket, welcome))
        }
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(other) => panic!("unexpected handshake error: {other}"),
    }
}

#[tokio::test]
async fn token_mode_admits_only_the_right_token_for_the_client_code() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__AUTH__MODE", "token"),
        (
            "QUOTEBRIDGE__AUTH__TOKENS",
            "acme=s3cret-acme,beta=s3cret-beta",
        ),
    ])
    .await;
    assert_eq!(
        open_with_query(&app, "acme", None).await.err(),
        Some(401),
        "missing token"
    );
    assert_eq!(
        open_with_header(&app, "acme", "wrong").await.err(),
        Some(401),
        "wrong token"
    );
    assert_eq!(
        open_with_header(&app, "acme", "s3cret-beta").await.err(),
        Some(401),
        "another code's token"
    );
    assert_eq!(
        open_with_header(&app, "nobody", "s3cret-acme").await.err(),
        Some(401),
        "unknown code"
    );
    let (_socket, welcome) = open_with_header(&app, "acme", "s3cret-acme")
        .await
        .expect("admitted by header");
    assert_eq!(welcome["client"], "acme");
    let (_socket, welcome) = open_with_query(&app, "beta", Some("s3cret-beta"))
        .await
        .expect("admitted by ?token=");
    assert_eq!(welcome["client"], "beta");
    app.shutdown().await;
}

#[tokio::test]
async fn jwt_mode_refuses_expired_foreign_tampered_and_missing_tokens() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__AUTH__MODE", "jwt"),
        ("QUOTEBRIDGE__AUTH__JWT_SECRET", SECRET),
        ("QUOTEBRIDGE__AUTH__JWT_LEEWAY_SECONDS", "0"),
    ])
    .await;
    let good = hs256(json!({"sub": "acme", "exp": now() + 300}));
    let expired = hs256(json!({"sub": "acme", "exp": now() - 300}));
    let foreign = hs256(json!({"sub": "beta", "exp": now() + 300}));
    let (head, _) = good.rsplit_once('.').expect("three parts");
    let tampered = format!("{head}.{}", "A".repeat(43));
    let other_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "acme", "exp": now() + 300}),
        &EncodingKey::from_secret(b"some-other-secret-entirely-here"),
    )
    .expect("sign");
    for (name, token) in [
        ("expired", &expired),
        ("for another code", &foreign),
        ("tampered", &tampered),
        ("signed with another key", &other_key),
    ] {
        assert_eq!(
            open_with_header(&app, "acme", token).await.err(),
            Some(401),
            "{name}"
        );
    }
    assert_eq!(
        open_with_query(&app, "acme", None).await.err(),
        Some(401),
        "missing"
    );
    let (_socket, welcome) = open_with_query(&app, "acme", Some(&good))
        .await
        .expect("valid token");
    assert_eq!(welcome["subscriptions"], json!(["*"]));
    app.shutdown().await;
}

#[tokio::test]
async fn an_entitled_socket_cannot_subscribe_outside_its_symbols() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__AUTH__MODE", "jwt"),
        ("QUOTEBRIDGE__AUTH__JWT_SECRET", SECRET),
        ("QUOTEBRIDGE__SMA__WINDOW", "1"),
    ])
    .await;
    let token = hs256(json!({"sub": "acme", "exp": now() + 300, "symbols": ["MSFT", "AAPL"]}));
    let (mut socket, welcome) = open_with_header(&app, "acme", &token)
        .await
        .expect("admitted");
    assert_eq!(
        welcome["subscriptions"],
        json!(["AAPL", "MSFT"]),
        "the default \"*\" narrows to the entitlement"
    );
    for symbols in [json!(["TSLA"]), json!(["*"]), json!(["AAPL", "TSLA"])] {
        let request = json!({"op": "subscribe", "symbols": symbols});
        assert_refused(&mut socket, request, "not entitled").await;
    }
    // Public quotes outside the entitlement never arrive; inside, they do.
    let mut conn = app.redis.connection().await;
    let quote = |s: &str| {
        (
            "quotes".to_owned(),
            format!(r#"{{"symbol":"{s}","price":1,"ts":1}}"#).into_bytes(),
        )
    };
    publish_all(&mut conn, &[quote("TSLA"), quote("AAPL")]).await;
    assert_eq!(next_json(&mut socket).await["symbol"], "AAPL");
    app.shutdown().await;
}

#[tokio::test]
async fn jwt_with_asymmetric_keys_from_pem_files() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    for (algorithm, name) in [(Algorithm::ES256, "es256"), (Algorithm::RS256, "rs256")] {
        let public = format!("{fixtures}/{name}-public.pem");
        let app = spawn_app_with(&[
            ("QUOTEBRIDGE__AUTH__MODE", "jwt"),
            (
                "QUOTEBRIDGE__AUTH__JWT_ALGORITHM",
                &format!("{algorithm:?}"),
            ),
            ("QUOTEBRIDGE__AUTH__JWT_PUBLIC_KEY_FILE", &public),
        ])
        .await;
        let private = std::fs::read(format!("{fixtures}/{name}-private.pem")).expect("private key");
        let key = match algorithm {
            Algorithm::ES256 => EncodingKey::from_ec_pem(&private),
            _ => EncodingKey::from_rsa_pem(&private),
        }
        .expect("parse private key");
        let token = jsonwebtoken::encode(
            &Header::new(algorithm),
            &json!({"sub": "acme", "exp": now() + 300}),
            &key,
        )
        .expect("sign");
        let (_socket, welcome) = open_with_header(&app, "acme", &token)
            .await
            .expect("admitted");
        assert_eq!(welcome["client"], "acme", "{algorithm:?}");
        assert_eq!(
            open_with_header(&app, "beta", &token).await.err(),
            Some(401),
            "{algorithm:?}: sub must match"
        );
        app.shutdown().await;
    }
}

/// A socket lives as long as its token: closed with 4001 when it expires,
/// unless a refresh with a fresh token for its own client code extends it
/// (what it may see narrowing to what both tokens allow, never widening).
#[tokio::test]
async fn a_socket_closes_when_its_token_expires_unless_a_refresh_extends_it() {
    let app = spawn_app_with(&[
        ("QUOTEBRIDGE__AUTH__MODE", "jwt"),
        ("QUOTEBRIDGE__AUTH__JWT_SECRET", SECRET),
        // The grant ends at exp plus the leeway (30 s by default).
        ("QUOTEBRIDGE__AUTH__JWT_LEEWAY_SECONDS", "0"),
        ("QUOTEBRIDGE__SMA__WINDOW", "1"),
    ])
    .await;
    let soon = now() + 2;
    let short = hs256(json!({"sub": "acme", "exp": soon}));
    let (mut expiring, welcome) = open_with_header(&app, "acme", &short)
        .await
        .expect("admitted");
    assert_eq!(welcome["expires_at"], soon, "the welcome says when");
    crate::schemas::assert_valid("welcome", &welcome);
    let (mut refreshed, _) = open_with_header(&app, "acme", &short)
        .await
        .expect("admitted");

    // Refused refreshes leave the socket as it was.
    let foreign = hs256(json!({"sub": "beta", "exp": now() + 300}));
    let stale = hs256(json!({"sub": "acme", "exp": now() - 60}));
    for (token, reason) in [
        (foreign.as_str(), "another client code"),
        (stale.as_str(), "expired"),
        ("not-a-jwt", "invalid token"),
    ] {
        send_json(&mut refreshed, json!({"op": "refresh", "token": token})).await;
        let reply = next_json(&mut refreshed).await;
        assert_eq!(reply["type"], "error", "{reply}");
        let message = reply["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("refresh refused") && message.contains(reason),
            "{message}"
        );
    }

    // A fresh token naming fewer symbols: the socket lasts until it
    // expires, and "*" narrows to what the new token allows.
    let later = now() + 300;
    let fresh = hs256(json!({"sub": "acme", "exp": later, "symbols": ["AAPL"]}));
    let request = json!({"op": "refresh", "token": fresh});
    crate::schemas::assert_valid("client-request", &request);
    send_json(&mut refreshed, request).await;
    let reply = next_json(&mut refreshed).await;
    assert_eq!(reply, json!({"type": "refreshed", "expires_at": later}));
    crate::schemas::assert_valid("refreshed", &reply);
    assert_eq!(
        next_json(&mut refreshed).await,
        json!({"type": "subscribed", "symbols": ["AAPL"]})
    );
    // A second refresh cannot widen it again.
    let wide = hs256(json!({"sub": "acme", "exp": later}));
    send_json(&mut refreshed, json!({"op": "refresh", "token": wide})).await;
    assert_eq!(next_json(&mut refreshed).await["type"], "refreshed");
    let request = json!({"op": "subscribe", "symbols": ["TSLA"]});
    assert_refused(&mut refreshed, request, "not entitled").await;

    // The unrefreshed socket is closed once its token expires (a second
    // or two from now), with the documented code and reason.
    assert_eq!(
        close_frame(&mut expiring).await,
        (4001, "token expired".to_owned())
    );
    let mut conn = app.redis.connection().await;
    let quote = |s: &str| {
        (
            "quotes".to_owned(),
            format!(r#"{{"symbol":"{s}","price":1,"ts":1}}"#).into_bytes(),
        )
    };
    publish_all(&mut conn, &[quote("TSLA"), quote("AAPL")]).await;
    assert_eq!(
        next_json(&mut refreshed).await["symbol"],
        "AAPL",
        "the refreshed socket outlives the old token, narrowed"
    );
    let stats = app.stats().await;
    assert_eq!(
        (
            stats["token_expiry_closes"].as_u64(),
            stats["token_refreshes"].as_u64()
        ),
        (Some(1), Some(2))
    );
    app.shutdown().await;
}
