//! Who may ingest and who may query: bearer tokens, stored as their SHA-256.
//!
//! ```toml
//! [auth]
//! required = true              # the default is false, allowed only on a loopback http.listen
//! open_metrics = false         # true: /metrics answers without a token
//! [[auth.gateways]]            # may POST /v1/ingest and /v1/heartbeat as this gateway
//! id = "gw-0001"
//! token_sha256 = "…"           # `kappa-cloud auth token` prints a token and this
//! devices = ["dev-1", "dev-2"] # optional device registry: only these devices' readings
//! [[auth.tokens]]              # may use the query API
//! name = "grafana"
//! token_sha256 = "…"
//! role = "read"                # or "admin": also acknowledges alerts
//! ```
//!
//! A credential with `revoked = true` is refused like an unknown one, and
//! counted apart. Tokens themselves are never stored, logged or echoed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::metrics::CloudMetrics;
use crate::pki::PkiError;

/// The `[auth]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Refuse ingest and API requests without a valid token. Off by default
    /// for local development, where `http.listen` must be a loopback
    /// address; the production example configs turn it on.
    #[serde(default)]
    pub required: bool,
    /// Serve without tokens on a non-loopback `http.listen` all the same
    /// (logged as a warning at every start). For a node behind something
    /// else that authenticates.
    #[serde(default)]
    pub insecure: bool,
    /// With `required`, `/metrics` answers without a token too. It names
    /// every gateway and its backlog, so by default it needs an API token
    /// (any role), as the query API does.
    #[serde(default)]
    pub open_metrics: bool,
    #[serde(default)]
    pub gateways: Vec<GatewayCredential>,
    #[serde(default)]
    pub tokens: Vec<ApiToken>,
}

/// One gateway's ingest credential.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayCredential {
    /// The gateway id its batches must carry.
    pub id: String,
    pub token_sha256: String,
    /// The devices registered to this gateway; readings of any other device
    /// are refused (counted as `unregistered_device`). Absent: any device.
    #[serde(default)]
    pub devices: Option<Vec<String>>,
    #[serde(default)]
    pub revoked: bool,
}

/// One API token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// Who holds it (for the operator; appears in logs when refused).
    pub name: String,
    pub token_sha256: String,
    pub role: Role,
    #[serde(default)]
    pub revoked: bool,
}

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Queries: devices, views, late events, aggregates, alerts.
    Read,
    /// Everything `read` may, and acknowledging alerts.
    Admin,
}

impl AuthConfig {
    /// Every problem, with its key path.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.required && self.gateways.is_empty() && self.tokens.is_empty() {
            out.push(
                "auth.required: there are no [[auth.gateways]] or [[auth.tokens]]: nobody could ingest or query".into(),
            );
        }
        let mut ids = HashSet::new();
        let mut hashes: Vec<(String, &str)> = Vec::new();
        for (i, g) in self.gateways.iter().enumerate() {
            if let Err(e) = kappa_common::reading::validate_device_id(&g.id) {
                out.push(format!("auth.gateways[{i}].id: {e}"));
            }
            if !ids.insert(g.id.as_str()) {
                out.push(format!("auth.gateways[{i}].id: {:?} has two credentials", g.id));
            }
            hashes.push((format!("auth.gateways[{i}].token_sha256"), &g.token_sha256));
            for (j, d) in g.devices.iter().flatten().enumerate() {
                if let Err(e) = kappa_common::reading::validate_device_id(d) {
                    out.push(format!("auth.gateways[{i}].devices[{j}]: {e}"));
                }
            }
        }
        let mut names = HashSet::new();
        for (i, t) in self.tokens.iter().enumerate() {
            if t.name.trim().is_empty() || !names.insert(t.name.as_str()) {
                out.push(format!("auth.tokens[{i}].name: {:?} is empty or used twice", t.name));
            }
            hashes.push((format!("auth.tokens[{i}].token_sha256"), &t.token_sha256));
        }
        let mut first: HashMap<&str, &str> = HashMap::new();
        for (key, hash) in &hashes {
            if !is_sha256_hex(hash) {
                out.push(format!(
                    "{key}: must be 64 lowercase hex digits (the SHA-256 of the token; see `kappa-cloud auth token`)"
                ));
            } else if let Some(earlier) = first.insert(*hash, key.as_str()) {
                out.push(format!("{key}: the same token as {}", earlier.trim_end_matches(".token_sha256")));
            }
        }
        out
    }
}

impl AuthConfig {
    /// Problems of serving on `listen` with this section: no tokens are
    /// allowed only where nobody but this machine can connect.
    pub fn exposure_problems(&self, listen: std::net::SocketAddr) -> Vec<String> {
        let mut out = Vec::new();
        if !self.required && !self.insecure && !listen.ip().is_loopback() {
            out.push(format!(
                "auth.required: false on http.listen = \"{listen}\", which other machines can reach: anyone could \
                 ingest, query and acknowledge alerts. Set auth.required = true with [[auth.gateways]] and \
                 [[auth.tokens]] (`kappa-cloud auth token`), listen on 127.0.0.1, or set auth.insecure = true \
                 if something in front of this node authenticates"
            ));
        }
        if self.required && self.insecure {
            out.push("auth.insecure: true has no effect with auth.required = true; remove one".into());
        }
        if !self.required && self.open_metrics {
            out.push("auth.open_metrics: without auth.required every route is open already; remove it".into());
        }
        out
    }

    /// Says at every start that a process serves without tokens where
    /// other machines can connect (only `auth.insecure = true` gets here).
    pub fn warn_if_exposed(&self, listen: std::net::SocketAddr) {
        if !self.required && !listen.ip().is_loopback() {
            tracing::warn!(
                %listen,
                "Serving without authentication where other machines can connect (auth.insecure = true): anyone who reaches it may ingest, query and acknowledge alerts."
            );
        }
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The SHA-256 of a token, as the config stores it.
pub fn token_sha256(token: &str) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()).as_ref())
}

/// A new random token (256 bits, hex, with a `kappa_` prefix that secret
/// scanners can match) and the SHA-256 the config stores instead of it.
pub fn new_token() -> Result<(String, String), PkiError> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| PkiError::Cert("no randomness from the system".into()))?;
    let token = format!("kappa_{}", hex(&bytes));
    let hash = token_sha256(&token);
    Ok((token, hash))
}

/// Lowercase hexadecimal.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An authenticated gateway.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub id: String,
    /// The registered devices; `None`: any.
    pub devices: Option<HashSet<String>>,
}

impl Gateway {
    /// May this gateway forward `device`'s readings?
    pub fn may_send(&self, device: &str) -> bool {
        self.devices.as_ref().is_none_or(|d| d.contains(device))
    }
}

#[derive(Debug)]
enum Principal {
    Gateway(Gateway, bool),
    Api(String, Role, bool),
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this endpoint needs `Authorization: Bearer <token>`")]
    Missing,
    #[error("the token is not known")]
    Unknown,
    #[error("the token was revoked")]
    Revoked,
    #[error("the token is not allowed here")]
    Forbidden,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Self::Forbidden => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "unauthenticated",
            Self::Unknown => "unknown_credential",
            Self::Revoked => "revoked_credential",
            Self::Forbidden => "forbidden",
        }
    }
}

/// The credentials, looked up by the SHA-256 of the presented token.
#[derive(Debug, Default)]
pub struct Auth {
    required: bool,
    open_metrics: bool,
    by_hash: HashMap<String, Principal>,
}

impl Auth {
    pub fn new(cfg: &AuthConfig) -> Self {
        let mut by_hash = HashMap::new();
        for g in &cfg.gateways {
            let devices = g.devices.as_ref().map(|d| d.iter().cloned().collect());
            by_hash
                .insert(g.token_sha256.clone(), Principal::Gateway(Gateway { id: g.id.clone(), devices }, g.revoked));
        }
        for t in &cfg.tokens {
            by_hash.insert(t.token_sha256.clone(), Principal::Api(t.name.clone(), t.role, t.revoked));
        }
        Self { required: cfg.required, open_metrics: cfg.open_metrics, by_hash }
    }

    /// Tokens are checked at all.
    pub fn required(&self) -> bool {
        self.required
    }

    /// `/metrics` needs an API token.
    pub fn guards_metrics(&self) -> bool {
        self.required && !self.open_metrics
    }

    fn principal(&self, headers: &HeaderMap) -> Result<&Principal, Refusal> {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::Missing)?;
        self.by_hash.get(&token_sha256(token)).ok_or(Refusal::Unknown)
    }

    /// The gateway a request comes from: `Ok(None)` when tokens are not
    /// required.
    pub fn gateway(&self, headers: &HeaderMap) -> Result<Option<&Gateway>, Refusal> {
        if !self.required {
            return Ok(None);
        }
        match self.principal(headers)? {
            Principal::Gateway(_, true) | Principal::Api(_, _, true) => Err(Refusal::Revoked),
            Principal::Gateway(g, false) => Ok(Some(g)),
            Principal::Api(..) => Err(Refusal::Forbidden),
        }
    }

    /// Checks an API request that needs `role`; returns who made it.
    pub fn api(&self, headers: &HeaderMap, role: Role) -> Result<Option<&str>, Refusal> {
        if !self.required {
            return Ok(None);
        }
        match self.principal(headers)? {
            Principal::Gateway(_, true) | Principal::Api(_, _, true) => Err(Refusal::Revoked),
            Principal::Api(name, held, false) if *held >= role => Ok(Some(name)),
            _ => Err(Refusal::Forbidden),
        }
    }
}

/// The state of the API middleware.
#[derive(Debug, Clone)]
pub struct ApiGuard {
    pub auth: Arc<Auth>,
    pub role: Role,
    pub metrics: Arc<CloudMetrics>,
    /// What each API token may spend per second (`api.max_requests_per_second`).
    pub rate: Option<Arc<kappa_runtime::rate::KeyedRate>>,
}

/// What a request costs against its token's rate: 1, and 1 more per 1,000
/// rows it may ask for (`limit`), so the widest page costs 11.
pub fn request_cost(query: Option<&str>) -> f64 {
    let limit = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("limit="))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1000)
        .min(crate::api::MAX_LIMIT as u64);
    1.0 + limit as f64 / 1000.0
}

/// How often a token over its rate may be logged.
static RATE_LOGGED: kappa_runtime::logging::Throttle =
    kappa_runtime::logging::Throttle::new(std::time::Duration::from_secs(10));

/// Refuses API requests without a token of the guard's role (401/403, JSON
/// with a reason, counted in `kappa_cloud_api_refused_total`), and those of
/// a token over its rate (429 with `Retry-After`).
pub async fn require(State(guard): State<ApiGuard>, req: Request, next: Next) -> Response {
    match guard.auth.api(req.headers(), guard.role) {
        Ok(Some(name)) if guard.rate.is_some() => {
            let cost = request_cost(req.uri().query());
            let Some(rate) = &guard.rate else { return next.run(req).await };
            match rate.admit(name, cost, std::time::Instant::now()) {
                Ok(()) => next.run(req).await,
                Err(refused) => {
                    guard.metrics.api_refused.get_or_create(&[("reason", "rate_limited")]).inc();
                    if RATE_LOGGED.ready() {
                        tracing::warn!(
                            token = name,
                            "An API token asks faster than api.max_requests_per_second; answered 429 (at most one line per 10 s; every one is counted)."
                        );
                    }
                    rate_limited_response(refused.wait)
                }
            }
        }
        Ok(_) => next.run(req).await,
        Err(refusal) => {
            guard.metrics.api_refused.get_or_create(&[("reason", refusal.reason())]).inc();
            tracing::warn!(path = %req.uri().path(), reason = refusal.reason(), "Refused an API request.");
            refusal_response(refusal)
        }
    }
}

/// The answer to a request over its token's rate.
fn rate_limited_response(wait: std::time::Duration) -> Response {
    let body = serde_json::json!({
        "error": "this token asks faster than api.max_requests_per_second; retry after the wait",
        "reason": "rate_limited",
    })
    .to_string();
    let mut resp = (StatusCode::TOO_MANY_REQUESTS, [("content-type", "application/json")], body).into_response();
    if let Ok(v) = (wait.as_secs_f64().ceil().max(1.0) as u64).to_string().parse() {
        resp.headers_mut().insert("retry-after", v);
    }
    resp
}

/// The answer to a refused request.
pub fn refusal_response(refusal: Refusal) -> Response {
    let body = serde_json::json!({ "error": refusal.to_string(), "reason": refusal.reason() }).to_string();
    let mut resp = (refusal.status(), [("content-type", "application/json")], body).into_response();
    if refusal.status() == StatusCode::UNAUTHORIZED
        && let Ok(v) = "Bearer".parse()
    {
        resp.headers_mut().insert("www-authenticate", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {token}").parse().unwrap());
        h
    }

    fn config() -> AuthConfig {
        toml::from_str(&format!(
            r#"required = true
            [[gateways]]
            id = "gw-1"
            token_sha256 = "{}"
            devices = ["dev-1"]
            [[gateways]]
            id = "gw-old"
            token_sha256 = "{}"
            revoked = true
            [[tokens]]
            name = "grafana"
            token_sha256 = "{}"
            role = "read"
            [[tokens]]
            name = "oncall"
            token_sha256 = "{}"
            role = "admin""#,
            token_sha256("g1"),
            token_sha256("old"),
            token_sha256("r"),
            token_sha256("a")
        ))
        .unwrap()
    }

    #[test]
    fn each_token_may_do_what_its_role_allows_and_nothing_else() {
        let cfg = config();
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        let auth = Auth::new(&cfg);
        let gw = auth.gateway(&headers("g1")).unwrap().unwrap();
        assert_eq!(gw.id, "gw-1");
        assert!(gw.may_send("dev-1") && !gw.may_send("dev-2"));
        assert_eq!(auth.gateway(&HeaderMap::new()).unwrap_err(), Refusal::Missing);
        assert_eq!(auth.gateway(&headers("nope")).unwrap_err(), Refusal::Unknown);
        assert_eq!(auth.gateway(&headers("old")).unwrap_err(), Refusal::Revoked);
        assert_eq!(auth.gateway(&headers("r")).unwrap_err(), Refusal::Forbidden, "an API token cannot ingest");
        assert_eq!(auth.api(&headers("r"), Role::Read).unwrap(), Some("grafana"));
        assert_eq!(auth.api(&headers("r"), Role::Admin).unwrap_err(), Refusal::Forbidden);
        assert_eq!(auth.api(&headers("a"), Role::Admin).unwrap(), Some("oncall"));
        assert_eq!(auth.api(&headers("g1"), Role::Read).unwrap_err(), Refusal::Forbidden, "a gateway cannot query");
        let open = Auth::new(&AuthConfig::default());
        assert!(open.gateway(&HeaderMap::new()).unwrap().is_none());
        assert!(open.api(&HeaderMap::new(), Role::Admin).unwrap().is_none());
    }

    #[test]
    fn bad_credentials_are_reported_with_their_key_paths() {
        let mut cfg = config();
        cfg.gateways[1].token_sha256 = cfg.gateways[0].token_sha256.clone();
        cfg.gateways[1].id = "gw-1".into();
        cfg.tokens[0].token_sha256 = "not-a-hash".into();
        let problems = cfg.problems().join("\n");
        assert!(problems.contains("auth.gateways[1].id: \"gw-1\" has two credentials"), "{problems}");
        assert!(problems.contains("auth.gateways[1].token_sha256: the same token as auth.gateways[0]"), "{problems}");
        assert!(problems.contains("auth.tokens[0].token_sha256: must be 64"), "{problems}");
        let empty = AuthConfig { required: true, ..Default::default() };
        assert!(empty.problems()[0].starts_with("auth.required"));
    }

    #[test]
    fn a_request_costs_one_and_one_per_thousand_rows_asked() {
        assert_eq!(request_cost(None), 2.0);
        assert_eq!(request_cost(Some("limit=100")), 1.1);
        assert_eq!(request_cost(Some("from=1&limit=10000&after=x")), 11.0);
        assert_eq!(request_cost(Some("limit=99999999")), 11.0, "capped at the largest page");
        assert_eq!(request_cost(Some("limit=nope")), 2.0);
    }

    #[test]
    fn tokens_are_random_and_stored_as_their_hash() {
        let (a, ha) = new_token().unwrap();
        let (b, _) = new_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("kappa_") && a.len() == 6 + 64);
        assert_eq!(ha.len(), 64);
        assert_eq!(ha, token_sha256(&a));
        // The well-known SHA-256 of "abc".
        assert_eq!(token_sha256("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
