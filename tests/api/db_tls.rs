//! TLS to PostgreSQL with libpq's rules: with `sslmode=require` the service's connections
//! are encrypted; with `REACHLY_DB_CA_FILE` the server's certificate is verified too (a
//! certificate from another CA is refused); without it the server is not authenticated,
//! as with libpq without `sslrootcert`.

use std::path::Path;
use std::process::Command;

use crate::helpers::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("openssl is required for this test (apt-get install openssl): {e}")
        });
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it, and an unrelated CA.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "other.key",
            "-out",
            "other-ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=another CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=reachly test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

#[tokio::test]
async fn sslmode_require_encrypts_and_verifies_the_server_certificate() {
    let certs = temp_dir("db-tls-certs");
    make_certs(&certs);
    let dir = temp_dir("db-tls-cluster");
    let certs_for_server = certs.clone();
    let cluster = tokio::task::spawn_blocking(move || {
        start_cluster_with(
            &dir,
            |data| {
                for f in ["server.crt", "server.key"] {
                    std::fs::copy(certs_for_server.join(f), data.join(f))?;
                }
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(
                    data.join("server.key"),
                    std::fs::Permissions::from_mode(0o600),
                )?;
                if reachly_ingest::pgcluster::running_as_root() {
                    Command::new("chown")
                        .arg("postgres:")
                        .arg(data.join("server.crt"))
                        .arg(data.join("server.key"))
                        .status()?;
                }
                Ok(())
            },
            &[
                ("ssl", "on"),
                ("ssl_cert_file", "server.crt"),
                ("ssl_key_file", "server.key"),
            ],
        )
    })
    .await
    .unwrap()
    .expect("a cluster with TLS");
    // The test's own connections do not use TLS (the service's do).
    let admin = connect(&format!("{} sslmode=disable", cluster.url("postgres"))).await;
    admin
        .batch_execute("CREATE DATABASE reachly")
        .await
        .unwrap();
    let url = format!("{} sslmode=require", cluster.url("reachly"));
    let ca = certs.join("ca.pem");

    // Verified against the test CA: works, and the server sees encrypted connections.
    let plain = format!("{} sslmode=disable", cluster.url("reachly"));
    let app = spawn_app_on(
        &plain,
        |a| {
            a.db.database_url = Some(reachly_ingest::config::Secret::new(url.clone()));
            a.db.ca_file = Some(ca.clone());
            a.db.migrate_on_start = true;
        },
        Default::default(),
    )
    .await;
    let r = app.http.get(app.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let encrypted: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'reachly-ingest' AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "the service's connections use TLS");
    app.stop().await;

    // A CA file that did not sign the server's certificate: refused.
    let wrong_ca = spawn_app_on(
        &plain,
        |a| {
            a.db.database_url = Some(reachly_ingest::config::Secret::new(url.clone()));
            a.db.ca_file = Some(certs.join("other-ca.pem"));
            a.db.connect_timeout = std::time::Duration::from_secs(2);
        },
        Default::default(),
    )
    .await;
    // Readiness does not depend on the database (an outage with spool room is ready), so
    // make the writer try: a pixel for a message that exists nowhere.
    let nowhere = Seeded {
        org: uuid::Uuid::new_v4(),
        campaign: uuid::Uuid::new_v4(),
        contact: uuid::Uuid::new_v4(),
        message: uuid::Uuid::new_v4(),
    };
    let t = wrong_ca.mint(reachly_ingest::token::Purpose::Open, &nowhere, None);
    assert_eq!(
        wrong_ca
            .get(&format!("/o/{t}.gif"), Some(BROWSER_UA))
            .await
            .status(),
        200
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let body = wrong_ca
            .http
            .get(wrong_ca.admin_url("/readyz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if body.contains("database unavailable") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a certificate from an unknown CA is refused: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        wrong_ca
            .metric(r#"reachly_events_written_total{type="opened"}"#)
            .await,
        0.0
    );
    wrong_ca.stop().await;

    // No CA file: encrypted, not authenticated (libpq's require without sslrootcert).
    let unverified = spawn_app_on(
        &plain,
        |a| a.db.database_url = Some(reachly_ingest::config::Secret::new(url.clone())),
        Default::default(),
    )
    .await;
    let r = unverified
        .http
        .get(unverified.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}
