//! TLS to PostgreSQL through `sslmode` in `DATABASE_URL`, against the local
//! server, which offers TLS (Debian's does, with its snakeoil certificate).

use test_kit::env::base_database_url;
use usage_worker::config::Settings;
use usage_worker::store;

#[tokio::test]
async fn sslmode_require_connects_over_tls() {
    let plain = sqlx::PgPool::connect(&base_database_url()).await.unwrap();
    let offered: String = sqlx::query_scalar("SHOW ssl").fetch_one(&plain).await.unwrap();
    // This machine's PostgreSQL offers TLS; a server that does not cannot
    // prove anything here, so the test says so rather than passing quietly.
    assert_eq!(
        offered, "on",
        "the PostgreSQL under test does not offer TLS (ssl = off)"
    );
    let mut url = url::Url::parse(&base_database_url()).unwrap();
    url.query_pairs_mut().append_pair("sslmode", "require");
    let settings = Settings::load_from(&[("DATABASE_URL".into(), url.to_string())]).unwrap();
    let pool = store::connect(&settings.database).await.unwrap();
    let encrypted: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(encrypted, "the connection is not encrypted");
}
