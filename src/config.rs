//! Typed settings, loaded in layers and validated at start-up.
//!
//! Layers, later wins: the embedded `config/default.toml`, then
//! `config/<USAGE_WORKER_ENV>.toml` (looked up under `USAGE_WORKER_CONFIG_DIR`,
//! default `config`), then `USAGE_WORKER__<SECTION>__<KEY>` environment
//! variables, then the conventional `DATABASE_URL` and
//! `KAFKA_BOOTSTRAP_SERVERS`, `HTTP_ADDR` and `HTTP_BEARER_TOKEN`. Unknown
//! keys and bad values stop start-up with a message naming the setting.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// `http.tokens` from the environment: a JSON array, since an environment
/// variable cannot hold TOML's array of tables.
const TOKENS_VAR: &str = "USAGE_WORKER__HTTP__TOKENS";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub kafka: KafkaSettings,
    pub topics: TopicSettings,
    pub pipeline: PipelineSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
    pub statement_timeout_ms: u64,
    pub migrate_on_start: bool,
}

/// The URL may carry a password: never print it.
impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("migrate_on_start", &self.migrate_on_start)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub group_id: String,
    #[serde(deserialize_with = "offset_reset")]
    pub auto_offset_reset: OffsetReset,
    pub session_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// Longest time between two polls of the usage consumer before the group
    /// evicts it (librdkafka's `max.poll.interval.ms`). The consumer keeps
    /// polling, with its partitions paused, while a batch cannot be decided
    /// (a database outage), so this bounds only a stuck consumer thread.
    pub max_poll_interval_ms: u64,
    /// How long a request to a broker may go unanswered before the
    /// connection is given up (librdkafka's `socket.timeout.ms`).
    pub socket_timeout_ms: u64,
    #[serde(deserialize_with = "security_protocol")]
    pub security_protocol: SecurityProtocol,
    /// With `sasl_*` protocols: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    #[serde(default, deserialize_with = "sasl_mechanism")]
    pub sasl_mechanism: Option<SaslMechanism>,
    pub sasl_username: Option<String>,
    /// Read from `USAGE_WORKER__KAFKA__SASL_PASSWORD`; never in a file.
    pub sasl_password: Option<Secret>,
    /// PEM file of the CA that signed the brokers' certificates; unset, the
    /// system's CA store is used.
    pub ssl_ca_location: Option<String>,
    /// How the producers of `usage-events` partition by key, so that what
    /// has no input partition (HTTP outcomes) lands where they put the
    /// subscription's events.
    #[serde(deserialize_with = "partitioner")]
    pub partitioner: Partitioner,
    /// Whether the end of a control partition that ListOffsets reports is
    /// confirmed by reading forward from it before each batch: needed on
    /// brokers that under-report it (tansu 0.6, docs/brokers.md), one more
    /// fetch per batch; Apache Kafka reports it right.
    pub confirm_partition_ends: bool,
}

/// The key hash that picks a record's partition, as Kafka clients do it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioner {
    /// The Java client's default (and librdkafka's `murmur2_random`).
    Murmur2,
    /// librdkafka's default (`consistent_random`, `consistent`): CRC-32 of
    /// the key.
    Crc32,
}

impl Partitioner {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Murmur2 => "murmur2",
            Self::Crc32 => "crc32",
        }
    }
}

/// How the clients talk to the brokers (librdkafka's `security.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    pub usage_events: String,
    pub subscriptions: String,
    pub invoice_events: String,
    pub usage_results: String,
    pub usage_alerts: String,
    pub dead_letters: String,
    /// Closed periods, for invoicing.
    pub usage_periods: String,
}

impl TopicSettings {
    /// Every topic the worker reads or writes.
    pub fn all(&self) -> [&str; 7] {
        let [results, alerts, dlq, periods] = self.outputs();
        [
            &self.usage_events,
            &self.subscriptions,
            &self.invoice_events,
            results,
            alerts,
            dlq,
            periods,
        ]
    }

    /// The topics the worker publishes, each with `usage_events`' partition count.
    pub fn outputs(&self) -> [&str; 4] {
        [
            &self.usage_results,
            &self.usage_alerts,
            &self.dead_letters,
            &self.usage_periods,
        ]
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    pub batch_size: usize,
    /// Most bytes of messages (keys and payloads) decided in one
    /// transaction; a batch takes at least one message whatever its size.
    pub max_batch_bytes: usize,
    pub linger_ms: u64,
    /// Batches decided at once, each in its own transaction, on partitions
    /// no other batch in flight holds.
    pub lanes: usize,
    pub max_payload_bytes: usize,
    pub max_future_usage_time_secs: i64,
    pub period_grace_secs: i64,
    /// How often every worker looks for periods whose end plus grace has
    /// passed, to close them and publish their records (at most 10 s).
    pub period_sweep_secs: u64,
    pub snapshot_wait_ms: u64,
    pub shutdown_timeout_ms: u64,
    pub retry_initial_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,
    pub outcome_retention_days: u32,
}

/// The HTTP API (`usage-worker serve`, and `run` unless disabled).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Whether `usage-worker run` serves the API next to the worker.
    pub enabled: bool,
    /// Listen address (`HTTP_ADDR`).
    pub addr: String,
    /// Larger request bodies are refused with 413, unread.
    pub max_body_bytes: usize,
    /// The same for `POST /usage-batches`, whose body holds up to 1,000
    /// usage bodies (each still held to `max_body_bytes`).
    pub max_batch_bytes: usize,
    /// Version 1's single token: a caller named `bearer_token` with every
    /// scope. Read from `HTTP_BEARER_TOKEN` or
    /// `USAGE_WORKER__HTTP__BEARER_TOKEN`.
    pub bearer_token: Option<Secret>,
    /// Named tokens with scopes (`[[http.tokens]]`), each by its SHA-256
    /// digest; or `USAGE_WORKER__HTTP__TOKENS` as a JSON array, which
    /// replaces them. Parsed and checked by [`HttpSettings::callers`].
    #[serde(default)]
    pub tokens: Vec<TokenEntry>,
    /// `/metrics` needs a token with the `metrics:read` scope.
    pub metrics_requires_token: bool,
    /// `run` (with the API on) and `serve` refuse to start with no token
    /// configured, unless `allow_anonymous` (the `production` profile).
    pub require_token: bool,
    /// Lets `require_token` start an API that anyone may call.
    pub allow_anonymous: bool,
    /// `/readyz` fails while more outbox records than this wait to be published.
    pub ready_max_outbox_backlog: i64,
    /// A connection that has not sent a whole request head this long after
    /// it began one is closed.
    pub header_read_timeout_ms: u64,
    /// A request not answered this long after its head was read is answered
    /// 503 and its work dropped (an open transaction rolls back).
    pub request_timeout_ms: u64,
    /// Connections served at once; further ones wait in the listen queue.
    pub max_connections: usize,
}

/// One `[[http.tokens]]` entry as written: `name`, `sha256` (64 lowercase
/// hex digits of the token's SHA-256) and `scopes`. Never the token itself.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    pub sha256: String,
    pub scopes: Vec<String>,
}

/// Settings are logged at start: a digest of a weak token could be
/// searched for, so it is left out.
impl std::fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// What a token lets its caller do; each guarded route needs one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `GET` of usages, their history and subscriptions' usage and periods.
    UsagesRead,
    /// Creates, amendments (`PUT`) and batches.
    UsagesWrite,
    /// Voids (`DELETE`).
    UsagesVoid,
    /// `/metrics`, when `http.metrics_requires_token`.
    MetricsRead,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Self::UsagesRead, Self::UsagesWrite, Self::UsagesVoid, Self::MetricsRead];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::UsagesRead => "usages:read",
            Self::UsagesWrite => "usages:write",
            Self::UsagesVoid => "usages:void",
            Self::MetricsRead => "metrics:read",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == text)
    }
}

/// A configured token, parsed: who presents it and what it may do.
#[derive(Clone, PartialEq, Eq)]
pub struct NamedToken {
    pub name: String,
    /// SHA-256 of the token.
    pub digest: [u8; 32],
    pub scopes: Vec<Scope>,
}

impl NamedToken {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// Digests are not secrets, but nothing gains from printing them.
impl std::fmt::Debug for NamedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedToken")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// The name of whoever presents `http.bearer_token`: idempotency keys are
/// scoped by it, so it stays what version 1 called it.
pub const BEARER_TOKEN_CALLER: &str = "bearer_token";

/// A setting that must never reach a log line: `Debug` prints `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that compares it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    #[serde(deserialize_with = "log_format")]
    pub format: LogFormat,
    pub level: String,
}

/// Enum settings are read as text so that the error names the setting (the
/// config crate's own enum errors do not).
fn offset_reset<'de, D: serde::Deserializer<'de>>(d: D) -> Result<OffsetReset, D::Error> {
    match String::deserialize(d)?.as_str() {
        "earliest" => Ok(OffsetReset::Earliest),
        "latest" => Ok(OffsetReset::Latest),
        other => Err(serde::de::Error::custom(format!(
            "kafka.auto_offset_reset must be \"earliest\" or \"latest\", got {other:?}"
        ))),
    }
}

fn security_protocol<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SecurityProtocol, D::Error> {
    let text = String::deserialize(d)?;
    [
        SecurityProtocol::Plaintext,
        SecurityProtocol::Ssl,
        SecurityProtocol::SaslPlaintext,
        SecurityProtocol::SaslSsl,
    ]
    .into_iter()
    .find(|p| p.as_str().eq_ignore_ascii_case(&text))
    .ok_or_else(|| {
        serde::de::Error::custom(format!(
            "kafka.security_protocol must be \"plaintext\", \"ssl\", \"sasl_plaintext\" or \"sasl_ssl\", got {text:?}"
        ))
    })
}

fn sasl_mechanism<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SaslMechanism>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    [
        SaslMechanism::Plain,
        SaslMechanism::ScramSha256,
        SaslMechanism::ScramSha512,
    ]
    .into_iter()
    .find(|m| m.as_str().eq_ignore_ascii_case(&text))
    .map(Some)
    .ok_or_else(|| {
        serde::de::Error::custom(format!(
            "kafka.sasl_mechanism must be \"PLAIN\", \"SCRAM-SHA-256\" or \"SCRAM-SHA-512\", got {text:?}"
        ))
    })
}

fn partitioner<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Partitioner, D::Error> {
    let text = String::deserialize(d)?;
    [Partitioner::Murmur2, Partitioner::Crc32]
        .into_iter()
        .find(|p| p.as_str().eq_ignore_ascii_case(&text))
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "kafka.partitioner must be \"murmur2\" or \"crc32\", got {text:?}"
            ))
        })
}

fn log_format<'de, D: serde::Deserializer<'de>>(d: D) -> Result<LogFormat, D::Error> {
    match String::deserialize(d)?.as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(serde::de::Error::custom(format!(
            "log.format must be \"text\" or \"json\", got {other:?}"
        ))),
    }
}

impl Settings {
    /// Loads the layers from the process environment.
    pub fn load() -> anyhow::Result<Self> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(&vars)
    }

    /// Loads the layers from the given environment (tests pass their own).
    pub fn load_from(vars: &[(String, String)]) -> anyhow::Result<Self> {
        let var = |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let mut builder =
            config::Config::builder().add_source(config::File::from_str(DEFAULT_TOML, config::FileFormat::Toml));
        if let Some(env) = var("USAGE_WORKER_ENV").filter(|e| !e.is_empty()) {
            let dir = PathBuf::from(var("USAGE_WORKER_CONFIG_DIR").unwrap_or_else(|| "config".into()));
            let path = dir.join(format!("{env}.toml"));
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("USAGE_WORKER_ENV={env}: cannot read {}", path.display()))?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        for (key, value) in vars {
            let Some(rest) = key.strip_prefix("USAGE_WORKER__") else {
                continue;
            };
            if key == TOKENS_VAR {
                continue; // JSON, read below
            }
            let path = rest.to_ascii_lowercase().replace("__", ".");
            builder = builder
                .set_override(&path, value.as_str())
                .with_context(|| format!("setting {key}"))?;
        }
        if let Some(url) = var("DATABASE_URL") {
            builder = builder.set_override("database.url", url)?;
        }
        if let Some(servers) = var("KAFKA_BOOTSTRAP_SERVERS") {
            builder = builder.set_override("kafka.bootstrap_servers", servers)?;
        }
        if let Some(addr) = var("HTTP_ADDR") {
            builder = builder.set_override("http.addr", addr)?;
        }
        if let Some(token) = var("HTTP_BEARER_TOKEN") {
            builder = builder.set_override("http.bearer_token", token)?;
        }
        let mut settings: Settings = builder
            .build()
            .context("loading settings")?
            .try_deserialize()
            .map_err(|e| anyhow::anyhow!("invalid setting: {e}"))?;
        if let Some(json) = var(TOKENS_VAR) {
            settings.http.tokens = serde_json::from_str(&json).map_err(|e| {
                anyhow::anyhow!(
                    "invalid setting http.tokens ({TOKENS_VAR}): want a JSON array of \
                     {{\"name\", \"sha256\", \"scopes\"}} objects: {e}"
                )
            })?;
        }
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        fn positive(name: &str, value: u64) -> anyhow::Result<()> {
            if value == 0 {
                bail!("invalid setting {name}: must be greater than 0");
            }
            Ok(())
        }
        if !self.database.url.starts_with("postgres://") && !self.database.url.starts_with("postgresql://") {
            bail!("invalid setting database.url (DATABASE_URL): must be a postgres:// URL");
        }
        positive("database.max_connections", self.database.max_connections.into())?;
        positive("database.statement_timeout_ms", self.database.statement_timeout_ms)?;
        if self.kafka.bootstrap_servers.trim().is_empty() {
            bail!("invalid setting kafka.bootstrap_servers (KAFKA_BOOTSTRAP_SERVERS): must not be empty");
        }
        if self.kafka.group_id.trim().is_empty() {
            bail!("invalid setting kafka.group_id: must not be empty");
        }
        positive("kafka.session_timeout_ms", self.kafka.session_timeout_ms)?;
        positive("kafka.heartbeat_interval_ms", self.kafka.heartbeat_interval_ms)?;
        if self.kafka.max_poll_interval_ms < self.kafka.session_timeout_ms {
            bail!("invalid setting kafka.max_poll_interval_ms: must be at least kafka.session_timeout_ms");
        }
        positive("kafka.socket_timeout_ms", self.kafka.socket_timeout_ms)?;
        self.kafka.validate_security()?;
        for (name, topic) in [
            ("topics.usage_events", &self.topics.usage_events),
            ("topics.subscriptions", &self.topics.subscriptions),
            ("topics.invoice_events", &self.topics.invoice_events),
            ("topics.usage_results", &self.topics.usage_results),
            ("topics.usage_alerts", &self.topics.usage_alerts),
            ("topics.dead_letters", &self.topics.dead_letters),
            ("topics.usage_periods", &self.topics.usage_periods),
        ] {
            if topic.is_empty()
                || topic.len() > 249
                || !topic.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                bail!("invalid setting {name}: {topic:?} is not a valid Kafka topic name");
            }
        }
        let p = &self.pipeline;
        positive("pipeline.batch_size", p.batch_size as u64)?;
        positive("pipeline.max_batch_bytes", p.max_batch_bytes as u64)?;
        positive("pipeline.lanes", p.lanes as u64)?;
        // Each lane holds a connection for its transaction; the relay holds
        // two during a round (its fence and its reads), and each of the two
        // control readers one while it applies. (The HTTP API has a pool of
        // its own; the assignment hook, the metrics sampler and the period
        // sweep borrow one briefly.)
        if p.lanes + 4 > self.database.max_connections as usize {
            bail!(
                "invalid setting pipeline.lanes: {} lanes need database.max_connections of at least {}",
                p.lanes,
                p.lanes + 4
            );
        }
        positive("pipeline.max_payload_bytes", p.max_payload_bytes as u64)?;
        positive("pipeline.shutdown_timeout_ms", p.shutdown_timeout_ms)?;
        positive("pipeline.retry_initial_backoff_ms", p.retry_initial_backoff_ms)?;
        if p.retry_max_backoff_ms < p.retry_initial_backoff_ms {
            bail!("invalid setting pipeline.retry_max_backoff_ms: must be at least pipeline.retry_initial_backoff_ms");
        }
        if p.max_future_usage_time_secs < 0 {
            bail!("invalid setting pipeline.max_future_usage_time_secs: must not be negative");
        }
        if p.period_grace_secs < 0 {
            bail!("invalid setting pipeline.period_grace_secs: must not be negative");
        }
        // SPEC: closing by time runs at least every 10 s.
        if !(1..=10).contains(&p.period_sweep_secs) {
            bail!(
                "invalid setting pipeline.period_sweep_secs: must be 1 to 10 seconds, got {}",
                p.period_sweep_secs
            );
        }
        self.http.validate()?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| anyhow::anyhow!("invalid setting log.level: {e}"))?;
        Ok(())
    }
}

impl KafkaSettings {
    /// SASL needs a mechanism and credentials, and they mean nothing
    /// without it; a CA file belongs to a TLS protocol and must be readable.
    fn validate_security(&self) -> anyhow::Result<()> {
        let protocol = self.security_protocol;
        let sasl = [
            ("kafka.sasl_mechanism", self.sasl_mechanism.is_some()),
            ("kafka.sasl_username", self.sasl_username.is_some()),
            (
                "kafka.sasl_password (USAGE_WORKER__KAFKA__SASL_PASSWORD)",
                self.sasl_password.is_some(),
            ),
        ];
        for (name, given) in sasl {
            if protocol.uses_sasl() && !given {
                bail!(
                    "invalid setting {name}: required with kafka.security_protocol = {}",
                    protocol.as_str()
                );
            }
            if !protocol.uses_sasl() && given {
                bail!("invalid setting {name}: only used with kafka.security_protocol = sasl_plaintext or sasl_ssl");
            }
        }
        if let Some(path) = &self.ssl_ca_location {
            if !protocol.uses_tls() {
                bail!(
                    "invalid setting kafka.ssl_ca_location: only used with kafka.security_protocol = ssl or sasl_ssl"
                );
            }
            if !std::path::Path::new(path).is_file() {
                bail!("invalid setting kafka.ssl_ca_location: {path:?} is not a readable file");
            }
        }
        Ok(())
    }
}

impl HttpSettings {
    fn validate(&self) -> anyhow::Result<()> {
        self.socket_addr()?;
        if self.max_body_bytes == 0 {
            bail!("invalid setting http.max_body_bytes: must be greater than 0");
        }
        if self.max_batch_bytes == 0 {
            bail!("invalid setting http.max_batch_bytes: must be greater than 0");
        }
        if self.ready_max_outbox_backlog <= 0 {
            bail!("invalid setting http.ready_max_outbox_backlog: must be greater than 0");
        }
        for (name, value) in [
            ("http.header_read_timeout_ms", self.header_read_timeout_ms),
            ("http.request_timeout_ms", self.request_timeout_ms),
            ("http.max_connections", self.max_connections as u64),
        ] {
            if value == 0 {
                bail!("invalid setting {name}: must be greater than 0");
            }
        }
        // An empty token would look like authentication while letting
        // nobody in (or, read carelessly, everybody): refuse it.
        if let Some(token) = self.bearer_token.as_ref().map(Secret::expose) {
            if token.trim().is_empty() {
                bail!("invalid setting http.bearer_token (HTTP_BEARER_TOKEN): must not be empty; unset it to turn authentication off");
            }
            // A bearer token has no whitespace (RFC 6750's b64token), and the
            // one presented is trimmed: a configured one with spaces or a
            // line break (a file read with its newline) would lock every
            // caller out.
            if token.contains(char::is_whitespace) {
                bail!(
                    "invalid setting http.bearer_token (HTTP_BEARER_TOKEN): contains whitespace (a trailing \
                     newline?), so no presented token could match it"
                );
            }
        }
        let callers = self.callers()?;
        if self.metrics_requires_token && !callers.iter().any(|t| t.allows(Scope::MetricsRead)) {
            bail!(
                "invalid setting http.metrics_requires_token: no token in http.tokens (or http.bearer_token) \
                 has the metrics:read scope, so nobody could read /metrics"
            );
        }
        Ok(())
    }

    /// Every configured token, parsed: `http.tokens`, then
    /// `http.bearer_token` as a caller named `bearer_token` with every
    /// scope. Names and digests are unique; errors name the entry
    /// (`http.tokens[2].sha256: ...`).
    pub fn callers(&self) -> anyhow::Result<Vec<NamedToken>> {
        let mut callers = Vec::with_capacity(self.tokens.len() + 1);
        for (index, entry) in self.tokens.iter().enumerate() {
            let key = format!("http.tokens[{index}]");
            callers.push(parse_token(&key, entry)?);
        }
        if let Some(secret) = &self.bearer_token {
            callers.push(NamedToken {
                name: BEARER_TOKEN_CALLER.to_owned(),
                digest: sha256(secret.expose()),
                scopes: Scope::ALL.to_vec(),
            });
        }
        for (index, token) in callers.iter().enumerate() {
            let key = key_of(self, index);
            if let Some(other) = callers[..index].iter().position(|t| t.name == token.name) {
                bail!(
                    "invalid setting {key}.name: {:?} is also the name of {}",
                    token.name,
                    key_of(self, other)
                );
            }
            if let Some(other) = callers[..index].iter().position(|t| t.digest == token.digest) {
                bail!(
                    "invalid setting {key}: the same token (sha256) as {}",
                    key_of(self, other)
                );
            }
        }
        Ok(callers)
    }

    /// Whether anyone can call the API: no token is configured.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty() && self.bearer_token.is_none()
    }

    /// Refuses to serve the API to anyone when a token is required
    /// (`http.require_token`, the `production` profile) and none is
    /// configured, unless `http.allow_anonymous` says so.
    pub fn check_callers_required(&self) -> anyhow::Result<()> {
        if self.require_token && !self.allow_anonymous && self.is_open() {
            bail!(
                "refusing to serve the HTTP API to anyone: http.require_token is set (the production profile) \
                 and no token is configured; add http.tokens entries (or USAGE_WORKER__HTTP__TOKENS, or \
                 HTTP_BEARER_TOKEN), or set http.allow_anonymous = true to serve it without authentication"
            );
        }
        Ok(())
    }

    pub fn socket_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        self.addr
            .parse()
            .map_err(|e| anyhow::anyhow!("invalid setting http.addr (HTTP_ADDR): {:?}: {e}", self.addr))
    }
}

/// How a caller is named in errors: its `http.tokens` entry, or
/// `http.bearer_token`, which comes last.
fn key_of(http: &HttpSettings, index: usize) -> String {
    if index < http.tokens.len() {
        format!("http.tokens[{index}]")
    } else {
        "http.bearer_token (HTTP_BEARER_TOKEN)".to_owned()
    }
}

fn parse_token(key: &str, entry: &TokenEntry) -> anyhow::Result<NamedToken> {
    let name = entry.name.trim();
    if name.is_empty() || name != entry.name || name.chars().any(char::is_control) {
        bail!(
            "invalid setting {key}.name: must not be empty, nor start or end with spaces, nor hold control characters"
        );
    }
    // What `anonymous` and version 1's token are recorded as stays theirs.
    if [BEARER_TOKEN_CALLER, "anonymous"].contains(&name) {
        bail!("invalid setting {key}.name: {name:?} is reserved");
    }
    let digest = &entry.sha256;
    let hex_ok = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex_ok {
        bail!(
            "invalid setting {key}.sha256: must be the token's SHA-256 as 64 lowercase hex digits \
             (printf %s \"$token\" | sha256sum), never the token itself"
        );
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digest[2 * i..2 * i + 2], 16).expect("checked hex digits");
    }
    if entry.scopes.is_empty() {
        bail!("invalid setting {key}.scopes: must name at least one scope");
    }
    let mut scopes = Vec::with_capacity(entry.scopes.len());
    for text in &entry.scopes {
        let scope = Scope::parse(text).ok_or_else(|| {
            let known: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
            anyhow::anyhow!(
                "invalid setting {key}.scopes: unknown scope {text:?}; known: {}",
                known.join(", ")
            )
        })?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    Ok(NamedToken {
        name: entry.name.clone(),
        digest: bytes,
        scopes,
    })
}

/// SHA-256 of a token, as configured digests hold it.
pub fn sha256(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

impl PipelineSettings {
    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }
    pub fn snapshot_wait(&self) -> Duration {
        Duration::from_millis(self.snapshot_wait_ms)
    }
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
    pub fn max_future(&self) -> chrono::Duration {
        chrono::Duration::seconds(self.max_future_usage_time_secs)
    }
    pub fn period_grace(&self) -> chrono::Duration {
        chrono::Duration::seconds(self.period_grace_secs)
    }
    pub fn period_sweep(&self) -> Duration {
        Duration::from_secs(self.period_sweep_secs)
    }
}

/// Replaces the password of a URL, for logs and errors.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparseable url>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn embedded_defaults_load() {
        let s = Settings::load_from(&[]).unwrap();
        assert_eq!(s.kafka.group_id, "usage-worker");
        assert_eq!(s.topics.usage_events, "usage-events");
        assert_eq!(s.pipeline.max_payload_bytes, 65536);
        assert_eq!(s.kafka.auto_offset_reset, OffsetReset::Earliest);
    }

    #[test]
    fn environment_overrides_sections_and_conventional_names() {
        let s = Settings::load_from(&env(&[
            ("USAGE_WORKER__PIPELINE__BATCH_SIZE", "17"),
            ("USAGE_WORKER__KAFKA__GROUP_ID", "billing"),
            ("DATABASE_URL", "postgres://u:p@db/x"),
            ("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092"),
        ]))
        .unwrap();
        assert_eq!(s.pipeline.batch_size, 17);
        assert_eq!(s.kafka.group_id, "billing");
        assert_eq!(s.database.url, "postgres://u:p@db/x");
        assert_eq!(s.kafka.bootstrap_servers, "k1:9092,k2:9092");
    }

    #[test]
    fn bad_value_names_the_setting() {
        let err = Settings::load_from(&env(&[("USAGE_WORKER__PIPELINE__BATCH_SIZE", "lots")])).unwrap_err();
        assert!(format!("{err:#}").contains("batch_size"), "{err:#}");
        let err = Settings::load_from(&env(&[("USAGE_WORKER__PIPELINE__BATCH_SIZE", "0")])).unwrap_err();
        assert!(format!("{err:#}").contains("pipeline.batch_size"), "{err:#}");
        let err = Settings::load_from(&env(&[("USAGE_WORKER__KAFKA__AUTO_OFFSET_RESET", "middle")])).unwrap_err();
        assert!(format!("{err:#}").contains("auto_offset_reset"), "{err:#}");
    }

    #[test]
    fn the_poll_interval_is_a_setting_no_shorter_than_the_session() {
        let settings = Settings::load_from(&env(&[("USAGE_WORKER__KAFKA__MAX_POLL_INTERVAL_MS", "20000")])).unwrap();
        assert_eq!(settings.kafka.max_poll_interval_ms, 20000);
        let err = Settings::load_from(&env(&[
            ("USAGE_WORKER__KAFKA__MAX_POLL_INTERVAL_MS", "5000"),
            ("USAGE_WORKER__KAFKA__SESSION_TIMEOUT_MS", "10000"),
        ]))
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("kafka.max_poll_interval_ms: must be at least kafka.session_timeout_ms"),
            "{err:#}"
        );
    }

    #[test]
    fn lanes_need_connections_of_their_own() {
        let err = Settings::load_from(&env(&[("USAGE_WORKER__PIPELINE__LANES", "0")])).unwrap_err();
        assert!(format!("{err:#}").contains("pipeline.lanes"), "{err:#}");
        let err = Settings::load_from(&env(&[
            ("USAGE_WORKER__PIPELINE__LANES", "5"),
            ("USAGE_WORKER__DATABASE__MAX_CONNECTIONS", "8"),
        ]))
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("pipeline.lanes: 5 lanes need database.max_connections of at least 9"),
            "{err:#}"
        );
        let s = Settings::load_from(&env(&[("USAGE_WORKER__PIPELINE__LANES", "4")])).unwrap();
        assert_eq!(s.pipeline.lanes, 4);
    }

    #[test]
    fn the_period_sweep_runs_at_least_every_ten_seconds() {
        let s = Settings::load_from(&[]).unwrap();
        assert_eq!(s.pipeline.period_sweep(), Duration::from_secs(5));
        assert_eq!(s.topics.usage_periods, "usage-periods");
        assert!(s.topics.outputs().contains(&"usage-periods"));
        for bad in ["11", "0"] {
            let err = Settings::load_from(&env(&[("USAGE_WORKER__PIPELINE__PERIOD_SWEEP_SECS", bad)])).unwrap_err();
            assert!(format!("{err:#}").contains("pipeline.period_sweep_secs"), "{err:#}");
        }
        let s = Settings::load_from(&env(&[
            ("USAGE_WORKER__PIPELINE__PERIOD_SWEEP_SECS", "10"),
            ("USAGE_WORKER__TOPICS__USAGE_PERIODS", "billing.periods"),
        ]))
        .unwrap();
        assert_eq!(s.pipeline.period_sweep_secs, 10);
        assert_eq!(s.topics.usage_periods, "billing.periods");
        let err = Settings::load_from(&env(&[("USAGE_WORKER__TOPICS__USAGE_PERIODS", "no spaces")])).unwrap_err();
        assert!(format!("{err:#}").contains("topics.usage_periods"), "{err:#}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Settings::load_from(&env(&[("USAGE_WORKER__PIPELINE__BATCH_SIZES", "5")])).unwrap_err();
        assert!(format!("{err:#}").contains("batch_sizes"), "{err:#}");
    }

    #[test]
    fn missing_environment_file_is_named() {
        let err = Settings::load_from(&env(&[("USAGE_WORKER_ENV", "nowhere")])).unwrap_err();
        assert!(format!("{err:#}").contains("nowhere.toml"), "{err:#}");
    }

    #[test]
    fn http_defaults_and_conventional_names() {
        let s = Settings::load_from(&[]).unwrap();
        assert!(s.http.enabled);
        assert_eq!(s.http.addr, "0.0.0.0:8080");
        assert_eq!(s.http.bearer_token, None);
        assert_eq!(s.http.max_batch_bytes, 4 * 1024 * 1024);
        let s = Settings::load_from(&env(&[
            ("HTTP_ADDR", "127.0.0.1:9000"),
            ("HTTP_BEARER_TOKEN", "t0ken"),
            ("USAGE_WORKER__HTTP__MAX_BODY_BYTES", "1024"),
            ("USAGE_WORKER__HTTP__MAX_BATCH_BYTES", "2048"),
        ]))
        .unwrap();
        assert_eq!(s.http.socket_addr().unwrap().port(), 9000);
        assert_eq!(s.http.bearer_token, Some(Secret::new("t0ken")));
        assert_eq!(s.http.max_body_bytes, 1024);
        assert_eq!(s.http.max_batch_bytes, 2048);
        let s = Settings::load_from(&env(&[("USAGE_WORKER__HTTP__BEARER_TOKEN", "other")])).unwrap();
        assert_eq!(s.http.bearer_token.unwrap().expose(), "other");
    }

    #[test]
    fn bad_http_settings_are_named() {
        let err = Settings::load_from(&env(&[("HTTP_ADDR", "nowhere")])).unwrap_err();
        assert!(format!("{err:#}").contains("HTTP_ADDR"), "{err:#}");
        let err = Settings::load_from(&env(&[("HTTP_BEARER_TOKEN", " ")])).unwrap_err();
        assert!(format!("{err:#}").contains("http.bearer_token"), "{err:#}");
        let err = Settings::load_from(&env(&[("HTTP_BEARER_TOKEN", "t0ken\n")])).unwrap_err();
        assert!(
            format!("{err:#}").contains("http.bearer_token (HTTP_BEARER_TOKEN): contains whitespace"),
            "{err:#}"
        );
        let err = Settings::load_from(&env(&[("USAGE_WORKER__HTTP__MAX_BATCH_BYTES", "0")])).unwrap_err();
        assert!(format!("{err:#}").contains("http.max_batch_bytes"), "{err:#}");
        for key in ["HEADER_READ_TIMEOUT_MS", "REQUEST_TIMEOUT_MS", "MAX_CONNECTIONS"] {
            let name = format!("http.{}", key.to_lowercase());
            let var = format!("USAGE_WORKER__HTTP__{key}");
            let err = Settings::load_from(&env(&[(var.as_str(), "0")])).unwrap_err();
            assert!(format!("{err:#}").contains(&name), "{err:#}");
            let err = Settings::load_from(&env(&[(var.as_str(), "soon")])).unwrap_err();
            assert!(format!("{err:#}").contains(&key.to_lowercase()), "{err:#}");
        }
    }

    #[test]
    fn the_server_limits_default_to_spec_and_can_be_set() {
        let s = Settings::load_from(&[]).unwrap();
        assert_eq!(s.http.header_read_timeout_ms, 10_000);
        assert_eq!(s.http.request_timeout_ms, 30_000);
        assert_eq!(s.http.max_connections, 1024);
        let s = Settings::load_from(&env(&[
            ("USAGE_WORKER__HTTP__HEADER_READ_TIMEOUT_MS", "300"),
            ("USAGE_WORKER__HTTP__REQUEST_TIMEOUT_MS", "500"),
            ("USAGE_WORKER__HTTP__MAX_CONNECTIONS", "2"),
        ]))
        .unwrap();
        assert_eq!(
            (
                s.http.header_read_timeout_ms,
                s.http.request_timeout_ms,
                s.http.max_connections
            ),
            (300, 500, 2)
        );
    }

    const DIGEST_A: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"; // "secret"
    const DIGEST_B: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // "test"

    fn tokens_json(entries: &[(&str, &str, &[&str])]) -> String {
        let entries: Vec<serde_json::Value> = entries
            .iter()
            .map(|(name, sha256, scopes)| serde_json::json!({"name": name, "sha256": sha256, "scopes": scopes}))
            .collect();
        serde_json::Value::from(entries).to_string()
    }

    fn tokens_error(entries: &[(&str, &str, &[&str])]) -> String {
        let json = tokens_json(entries);
        format!(
            "{:#}",
            Settings::load_from(&env(&[("USAGE_WORKER__HTTP__TOKENS", &json)])).unwrap_err()
        )
    }

    #[test]
    fn named_tokens_load_from_a_file_and_from_the_environment() {
        let dir = std::env::temp_dir().join(format!("usage-worker-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("callers.toml"),
            format!(
                "[[http.tokens]]\nname = \"invoicing\"\nsha256 = \"{DIGEST_A}\"\nscopes = [\"usages:read\", \"usages:write\"]\n\n\
                 [[http.tokens]]\nname = \"scraper\"\nsha256 = \"{DIGEST_B}\"\nscopes = [\"metrics:read\"]\n"
            ),
        )
        .unwrap();
        let loaded = Settings::load_from(&env(&[
            ("USAGE_WORKER_ENV", "callers"),
            ("USAGE_WORKER_CONFIG_DIR", dir.to_str().unwrap()),
        ]));
        std::fs::remove_dir_all(&dir).unwrap();
        let callers = loaded.unwrap().http.callers().unwrap();
        assert_eq!(callers.len(), 2);
        assert_eq!(callers[0].name, "invoicing");
        assert_eq!(callers[0].digest, sha256("secret"));
        assert_eq!(callers[0].scopes, [Scope::UsagesRead, Scope::UsagesWrite]);
        assert_eq!(callers[1].scopes, [Scope::MetricsRead]);

        let json = tokens_json(&[("voider", DIGEST_B, &["usages:void"])]);
        let s = Settings::load_from(&env(&[
            ("USAGE_WORKER__HTTP__TOKENS", &json),
            ("HTTP_BEARER_TOKEN", "v1"),
        ]))
        .unwrap();
        let callers = s.http.callers().unwrap();
        assert_eq!(callers[0].name, "voider");
        assert_eq!(callers[0].scopes, [Scope::UsagesVoid]);
        // Version 1's token: every scope, under the name its idempotency
        // keys have always been scoped by.
        assert_eq!(callers[1].name, BEARER_TOKEN_CALLER);
        assert_eq!(callers[1].digest, sha256("v1"));
        assert_eq!(callers[1].scopes, Scope::ALL);
        assert!(!s.http.is_open());
        assert!(Settings::load_from(&[]).unwrap().http.is_open());
    }

    #[test]
    fn bad_tokens_are_named_by_their_entry() {
        let ok: (&str, &str, &[&str]) = ("a", DIGEST_A, &["usages:read"]);
        let err = tokens_error(&[ok, ("b", DIGEST_B, &["usages:read"]), ("c", "secret", &["usages:read"])]);
        assert!(err.contains("http.tokens[2].sha256"), "{err}");
        assert!(!err.contains("secret\""), "{err}");
        let upper = DIGEST_B.to_uppercase();
        let err = tokens_error(&[ok, ("b", &upper, &["usages:read"])]);
        assert!(err.contains("http.tokens[1].sha256"), "{err}");
        let err = tokens_error(&[ok, ("b", DIGEST_B, &["usages:delete"])]);
        assert!(
            err.contains("http.tokens[1].scopes: unknown scope \"usages:delete\""),
            "{err}"
        );
        let err = tokens_error(&[ok, ("b", DIGEST_B, &[])]);
        assert!(err.contains("http.tokens[1].scopes"), "{err}");
        let err = tokens_error(&[ok, ("", DIGEST_B, &["usages:read"])]);
        assert!(err.contains("http.tokens[1].name"), "{err}");
        let err = tokens_error(&[ok, ("a", DIGEST_B, &["usages:read"])]);
        assert!(
            err.contains("http.tokens[1].name: \"a\" is also the name of http.tokens[0]"),
            "{err}"
        );
        let err = tokens_error(&[ok, ("b", DIGEST_A, &["usages:read"])]);
        assert!(
            err.contains("http.tokens[1]: the same token (sha256) as http.tokens[0]"),
            "{err}"
        );
        for reserved in ["bearer_token", "anonymous"] {
            let err = tokens_error(&[(reserved, DIGEST_A, &["usages:read"])]);
            assert!(
                err.contains("http.tokens[0].name: ") && err.contains("is reserved"),
                "{err}"
            );
        }
        let json = tokens_json(&[ok]);
        let err = Settings::load_from(&env(&[
            ("USAGE_WORKER__HTTP__TOKENS", &json),
            ("HTTP_BEARER_TOKEN", "secret"),
        ]))
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("http.bearer_token (HTTP_BEARER_TOKEN): the same token"),
            "{err:#}"
        );
        let err = Settings::load_from(&env(&[("USAGE_WORKER__HTTP__TOKENS", "{\"name\": \"a\"}")])).unwrap_err();
        assert!(format!("{err:#}").contains("USAGE_WORKER__HTTP__TOKENS"), "{err:#}");
        let err = Settings::load_from(&env(&[(
            "USAGE_WORKER__HTTP__TOKENS",
            &format!("[{{\"name\": \"a\", \"sha256\": \"{DIGEST_A}\", \"scopes\": [], \"token\": \"x\"}}]"),
        )]))
        .unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
    }

    #[test]
    fn metrics_behind_a_token_need_a_token_with_its_scope() {
        let err = Settings::load_from(&env(&[("USAGE_WORKER__HTTP__METRICS_REQUIRES_TOKEN", "true")])).unwrap_err();
        assert!(format!("{err:#}").contains("http.metrics_requires_token"), "{err:#}");
        let readers = tokens_json(&[("a", DIGEST_A, &["usages:read"])]);
        let err = Settings::load_from(&env(&[
            ("USAGE_WORKER__HTTP__METRICS_REQUIRES_TOKEN", "true"),
            ("USAGE_WORKER__HTTP__TOKENS", &readers),
        ]))
        .unwrap_err();
        assert!(format!("{err:#}").contains("metrics:read"), "{err:#}");
        let scraper = tokens_json(&[("a", DIGEST_A, &["metrics:read"])]);
        let s = Settings::load_from(&env(&[
            ("USAGE_WORKER__HTTP__METRICS_REQUIRES_TOKEN", "true"),
            ("USAGE_WORKER__HTTP__TOKENS", &scraper),
        ]))
        .unwrap();
        assert!(s.http.metrics_requires_token);
    }

    #[test]
    fn the_production_profile_requires_a_token_unless_anonymous_is_allowed() {
        let production = |extra: &[(&str, &str)]| {
            let mut vars = env(&[
                ("USAGE_WORKER_ENV", "production"),
                (
                    "USAGE_WORKER_CONFIG_DIR",
                    concat!(env!("CARGO_MANIFEST_DIR"), "/config"),
                ),
            ]);
            vars.extend(env(extra));
            Settings::load_from(&vars).unwrap().http
        };
        let err = production(&[]).check_callers_required().unwrap_err();
        assert!(format!("{err:#}").contains("http.tokens"), "{err:#}");
        production(&[("USAGE_WORKER__HTTP__ALLOW_ANONYMOUS", "true")])
            .check_callers_required()
            .unwrap();
        production(&[("HTTP_BEARER_TOKEN", "v1")])
            .check_callers_required()
            .unwrap();
        let json = tokens_json(&[("a", DIGEST_A, &["usages:read"])]);
        production(&[("USAGE_WORKER__HTTP__TOKENS", &json)])
            .check_callers_required()
            .unwrap();
        // The default profile stays open for a newcomer.
        Settings::load_from(&[]).unwrap().http.check_callers_required().unwrap();
    }

    #[test]
    fn token_digests_never_print() {
        let json = tokens_json(&[("invoicing", DIGEST_A, &["usages:read"])]);
        let s = Settings::load_from(&env(&[("USAGE_WORKER__HTTP__TOKENS", &json)])).unwrap();
        let printed = format!("{s:?} {:?}", s.http.callers().unwrap());
        assert!(printed.contains("invoicing"), "{printed}");
        assert!(!printed.contains(&DIGEST_A[..16]), "{printed}");
    }

    #[test]
    fn bearer_token_never_prints() {
        let s = Settings::load_from(&env(&[("HTTP_BEARER_TOKEN", "hunter3")])).unwrap();
        let printed = format!("{s:?}");
        assert!(!printed.contains("hunter3"), "{printed}");
    }

    #[test]
    fn kafka_security_is_read_and_checked() {
        let s = Settings::load_from(&[]).unwrap();
        assert_eq!(s.kafka.security_protocol, SecurityProtocol::Plaintext);
        let s = Settings::load_from(&env(&[
            ("USAGE_WORKER__KAFKA__SECURITY_PROTOCOL", "SASL_SSL"),
            ("USAGE_WORKER__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
            ("USAGE_WORKER__KAFKA__SASL_USERNAME", "billing"),
            ("USAGE_WORKER__KAFKA__SASL_PASSWORD", "kafka-hunter2"),
        ]))
        .unwrap();
        assert_eq!(s.kafka.security_protocol, SecurityProtocol::SaslSsl);
        assert_eq!(s.kafka.sasl_mechanism, Some(SaslMechanism::ScramSha512));
        assert!(!format!("{s:?}").contains("kafka-hunter2"));

        let err = Settings::load_from(&env(&[("USAGE_WORKER__KAFKA__SECURITY_PROTOCOL", "sasl_ssl")])).unwrap_err();
        assert!(format!("{err:#}").contains("kafka.sasl_mechanism"), "{err:#}");
        let err = Settings::load_from(&env(&[("USAGE_WORKER__KAFKA__SASL_USERNAME", "billing")])).unwrap_err();
        assert!(format!("{err:#}").contains("kafka.sasl_username"), "{err:#}");
        let err = Settings::load_from(&env(&[("USAGE_WORKER__KAFKA__SECURITY_PROTOCOL", "tls")])).unwrap_err();
        assert!(format!("{err:#}").contains("security_protocol"), "{err:#}");
        let err = Settings::load_from(&env(&[
            ("USAGE_WORKER__KAFKA__SECURITY_PROTOCOL", "ssl"),
            ("USAGE_WORKER__KAFKA__SSL_CA_LOCATION", "/nowhere/ca.pem"),
        ]))
        .unwrap_err();
        assert!(format!("{err:#}").contains("kafka.ssl_ca_location"), "{err:#}");
    }

    #[test]
    fn the_partitioner_is_murmur2_unless_set_to_crc32() {
        let s = Settings::load_from(&[]).unwrap();
        assert_eq!(s.kafka.partitioner, Partitioner::Murmur2);
        let s = Settings::load_from(&env(&[("USAGE_WORKER__KAFKA__PARTITIONER", "crc32")])).unwrap();
        assert_eq!(s.kafka.partitioner, Partitioner::Crc32);
        let err = Settings::load_from(&env(&[("USAGE_WORKER__KAFKA__PARTITIONER", "consistent")])).unwrap_err();
        assert!(format!("{err:#}").contains("kafka.partitioner"), "{err:#}");
    }

    #[test]
    fn database_password_never_prints() {
        let s = Settings::load_from(&env(&[("DATABASE_URL", "postgres://u:hunter2@db/x")])).unwrap();
        let printed = format!("{s:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("***"));
    }
}
