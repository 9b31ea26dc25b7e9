//! TLS to Redis: a real redis-server on a TLS port, with certificates this
//! test makes (a CA, the server's, a client's, and a second CA that signed
//! none of them). Results flow over TLS; a wrong CA, an expired server
//! certificate and a plain-text port each fail in one line that says why;
//! a server that asks for client certificates admits the bridge only with one;
//! and a Redis Cluster speaking TLS carries sharded pub/sub.

use std::path::{Path, PathBuf};
use std::process::Child;

use quotebridge::broker::{RedisBroker, TlsFiles};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::json;

use crate::support::*;

/// The test's certificates, written as PEM files in a directory of its own.
struct Certificates {
    dir: PathBuf,
}

impl Certificates {
    fn make(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("quotebridge-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("certificate directory");
        let other_ca = new_ca("a CA nobody trusts");
        let ca = new_ca("quotebridge test CA");
        let write =
            |file: &str, text: String| std::fs::write(dir.join(file), text).expect("write PEM");
        write("ca.pem", ca.pem());
        write("other-ca.pem", other_ca.pem());
        let leaf = |names: Vec<String>, expired: bool, file: &str| {
            let mut params = CertificateParams::new(names).expect("names");
            if expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let key = KeyPair::generate().expect("key");
            let certificate = params.signed_by(&key, &ca).expect("sign");
            write(&format!("{file}.pem"), certificate.pem());
            write(&format!("{file}.key"), key.serialize_pem());
        };
        let server = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        leaf(server.clone(), false, "server");
        leaf(server, true, "expired");
        leaf(vec!["quotebridge-client".to_owned()], false, "client");
        Self { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Files that trust the test CA, with the client certificate or not.
    fn files(&self, client_certificate: bool) -> TlsFiles {
        TlsFiles {
            ca_file: Some(self.path("ca.pem")),
            cert_file: client_certificate.then(|| self.path("client.pem")),
            key_file: client_certificate.then(|| self.path("client.key")),
            insecure: false,
        }
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
}

/// A redis-server with a plain port (for the test's own clients) and a TLS
/// port serving `certificate`, asking clients for theirs when
/// `client_certificates`; killed on drop.
struct TlsRedis {
    child: Child,
    plain: u16,
    tls: u16,
}

impl TlsRedis {
    async fn start(
        certificates: &Certificates,
        certificate: &str,
        client_certificates: bool,
    ) -> Self {
        for _ in 0..5 {
            let (plain, tls) = (free_port(), free_port());
            let path = |file: &str| certificates.path(file).display().to_string();
            let args = [
                "--tls-port".to_owned(),
                tls.to_string(),
                "--tls-cert-file".to_owned(),
                path(&format!("{certificate}.pem")),
                "--tls-key-file".to_owned(),
                path(&format!("{certificate}.key")),
                "--tls-ca-cert-file".to_owned(),
                path("ca.pem"),
                "--tls-auth-clients".to_owned(),
                if client_certificates { "yes" } else { "no" }.to_owned(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut child = spawn_redis_server(plain, &args, None);
            if wait_until_ready(&mut child, plain).await {
                return Self { child, plain, tls };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server with TLS did not come up (is it built with TLS? Debian's is)");
    }

    fn url(&self) -> String {
        format!("rediss://localhost:{}", self.tls)
    }

    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.plain))
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("plain connection")
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The one-line error of pinging `url` with `files`.
async fn refusal(url: &str, files: &TlsFiles) -> String {
    let broker = RedisBroker::with_tls(url, files).expect("the files load");
    let err = broker.ping().await.expect_err("refused");
    let line = err.to_string();
    assert!(!line.contains('\n'), "one line: {line}");
    line
}

#[tokio::test]
async fn results_flow_over_tls_and_bad_certificates_fail_in_one_line() {
    let certificates = Certificates::make("flow");
    let redis = TlsRedis::start(&certificates, "server", false).await;
    let ca = certificates.path("ca.pem").display().to_string();
    let url = redis.url();
    let env = [
        ("QUOTEBRIDGE__REDIS__URL", url.as_str()),
        ("QUOTEBRIDGE__REDIS__TLS_CA_FILE", ca.as_str()),
        ("QUOTEBRIDGE__SMA__WINDOW", "1"),
    ];
    let mut bridge = bridge_with(&env).await;
    let (mut socket, _) = connect_ws(&format!("ws://{}/ws/acme", bridge.address)).await;
    let mut conn = redis.connection().await;
    let mut output = redis::Client::open(format!("redis://127.0.0.1:{}", redis.plain))
        .expect("url")
        .get_async_pubsub()
        .await
        .expect("pubsub");
    output.subscribe("sma").await.expect("subscribe");
    let mut output = output.on_message();
    let quote = json!({"symbol": "AAPL", "price": 187.42, "ts": 1});
    publish_all(
        &mut conn,
        &[("quotes".to_owned(), quote.to_string().into_bytes())],
    )
    .await;
    // In over the TLS subscriber connection, out to the socket and, over the
    // TLS publisher connection, to Redis.
    assert_eq!(next_json(&mut socket).await["sma"], 187.42);
    let (_, published) = next_redis(&mut output).await;
    assert!(published.contains(r#""sma":187.42"#), "{published}");
    bridge.stop().await;

    // A CA that did not sign the server's certificate.
    let wrong_ca = TlsFiles {
        ca_file: Some(certificates.path("other-ca.pem")),
        ..TlsFiles::default()
    };
    let line = refusal(&url, &wrong_ca).await;
    assert!(line.contains("UnknownIssuer"), "{line}");
    // The subscriber connection written here says the same.
    let broker = RedisBroker::with_tls(&url, &wrong_ca).expect("loads");
    let topics = [quotebridge::broker::Topic::Channel("quotes".to_owned())];
    let err = quotebridge::broker::Broker::subscribe(&broker, &topics)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    // The plain-text port, asked for TLS.
    let plain = format!("rediss://localhost:{}", redis.plain);
    let line = refusal(&plain, &certificates.files(false)).await;
    assert!(line.contains("is it redis-server's TLS port"), "{line}");
    drop(redis);

    // An expired server certificate.
    let expired = TlsRedis::start(&certificates, "expired", false).await;
    let line = refusal(&expired.url(), &certificates.files(false)).await;
    assert!(line.contains("certificate expired"), "{line}");
}

#[tokio::test]
async fn a_server_that_asks_for_client_certificates_admits_only_with_one() {
    let certificates = Certificates::make("mutual");
    let redis = TlsRedis::start(&certificates, "server", true).await;
    let with = RedisBroker::with_tls(&redis.url(), &certificates.files(true)).expect("loads");
    with.ping()
        .await
        .expect("admitted with a client certificate");
    let line = refusal(&redis.url(), &certificates.files(false)).await;
    assert!(line.starts_with("redis: "), "{line}");
    // Verification off: any server certificate is taken (and a warning logged).
    let insecure = TlsFiles {
        insecure: true,
        ..certificates.files(true)
    };
    let insecure = TlsFiles {
        ca_file: None,
        ..insecure
    };
    RedisBroker::with_tls(&redis.url(), &insecure)
        .expect("loads")
        .ping()
        .await
        .expect("unverified, but connected");
    // Files that are not what they should be say which setting.
    let missing = TlsFiles {
        ca_file: Some(Path::new("/nonexistent/ca.pem").to_owned()),
        ..TlsFiles::default()
    };
    let err = RedisBroker::with_tls(&redis.url(), &missing).expect_err("no such file");
    assert!(err.to_string().starts_with("redis.tls_ca_file"), "{err}");
    let half = TlsFiles {
        key_file: None,
        ..certificates.files(true)
    };
    let err =
        RedisBroker::with_tls(&redis.url(), &half).expect_err("a certificate without its key");
    assert!(err.to_string().contains("together"), "{err}");
}

/// A three-master Redis Cluster speaking TLS (`tls-cluster yes`: nodes
/// announce their TLS ports): the cluster broker subscribes to a sharded
/// channel and publishes to it over TLS, verified against the test CA.
#[tokio::test]
async fn a_tls_cluster_carries_sharded_pub_sub() {
    use futures_util::StreamExt;
    use quotebridge::broker::{Broker, ClusterBroker, Outbound, Topic};

    let certificates = Certificates::make("cluster");
    let path = |file: &str| certificates.path(file).display().to_string();
    let mut nodes: Vec<(Child, u16, u16)> = Vec::new();
    for _ in 0..3 {
        let (plain, tls, bus) = (free_port(), free_port(), free_port());
        let table = format!("nodes-{plain}.conf");
        let args = [
            "--cluster-enabled".to_owned(),
            "yes".to_owned(),
            "--cluster-port".to_owned(),
            bus.to_string(),
            "--cluster-config-file".to_owned(),
            table,
            "--tls-port".to_owned(),
            tls.to_string(),
            "--tls-cluster".to_owned(),
            "yes".to_owned(),
            "--tls-cert-file".to_owned(),
            path("server.pem"),
            "--tls-key-file".to_owned(),
            path("server.key"),
            "--tls-ca-cert-file".to_owned(),
            path("ca.pem"),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = spawn_redis_server(plain, &args, Some(&certificates.dir));
        assert!(
            wait_until_ready(&mut child, plain).await,
            "a TLS cluster node"
        );
        nodes.push((child, plain, tls));
    }
    let addresses: Vec<String> = nodes
        .iter()
        .map(|(_, plain, _)| format!("127.0.0.1:{plain}"))
        .collect();
    let created = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli (sudo apt-get install -y redis-tools)");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );
    for (_, plain, _) in &nodes {
        eventually("the cluster to agree", async || {
            let client = redis::Client::open(format!("redis://127.0.0.1:{plain}")).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await
                .ok()?;
            info.contains("cluster_state:ok").then_some(())
        })
        .await;
    }

    let seeds: Vec<String> = nodes
        .iter()
        .map(|(_, _, tls)| format!("rediss://localhost:{tls}"))
        .collect();
    let broker = ClusterBroker::with_tls(&seeds, &certificates.files(false)).expect("loads");
    let channel = "quotes.{7}";
    let mut messages = broker
        .subscribe(&[Topic::Sharded(channel.to_owned())])
        .await
        .expect("SSUBSCRIBE over TLS");
    eventually("a message over TLS", async || {
        let message = Outbound::new(channel.into(), bytes::Bytes::from_static(b"over tls"));
        broker.publish(&[message]).await.expect("SPUBLISH over TLS");
        let next = tokio::time::timeout(std::time::Duration::from_millis(200), messages.next());
        match next.await {
            Ok(Some(inbound)) => Some(inbound.payload),
            _ => None,
        }
    })
    .await;
    let wrong = ClusterBroker::with_tls(
        &seeds,
        &TlsFiles {
            ca_file: Some(certificates.path("other-ca.pem")),
            ..TlsFiles::default()
        },
    )
    .expect("loads");
    let message = Outbound::new(channel.into(), bytes::Bytes::from_static(b"refused"));
    let err = wrong.publish(&[message]).await.expect_err("an unknown CA");
    assert!(
        err.to_string().contains("UnknownIssuer") && !err.to_string().contains('\n'),
        "{err}"
    );
    for (mut child, _, _) in nodes {
        let _ = child.kill();
        let _ = child.wait();
    }
}
