//! Who may open a socket as a client code, and which symbols it may see.
//!
//! Checked before the WebSocket upgrade; a refusal is HTTP 401. Tokens and
//! secrets are never logged: neither [`Authenticator`] nor the settings it is
//! built from print them in `Debug`.

use std::collections::{BTreeSet, HashMap};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::config::{AuthMode, AuthSettings, ConfigError};
use crate::names::{self, StreamName};

/// What an authenticated socket may do, and until when.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// The public symbols it may subscribe to; `None` means all of them.
    /// `"*"` in the set also means all.
    pub symbols: Option<BTreeSet<String>>,
    /// When the grant ends, in seconds since the Unix epoch: a JWT's `exp`
    /// plus `auth.jwt_leeway_seconds` (the moment a new connection with the
    /// token would be refused). `None` for tokens that do not expire.
    pub expires_at: Option<u64>,
}

impl Grant {
    /// Whether the socket may subscribe to `symbol` (or `"*"`), in any
    /// series (`AAPL@candles.1m` is allowed where `AAPL` is).
    #[must_use]
    pub fn allows(&self, symbol: &str) -> bool {
        let symbol = StreamName::split(symbol).symbol;
        match &self.symbols {
            None => true,
            Some(set) => set.contains(names::ALL_SYMBOLS) || set.contains(symbol),
        }
    }

    /// This grant renewed by `fresh` (a new token for the same client code):
    /// it ends when `fresh` does, and it allows what both allow, so a
    /// refresh can narrow what a connection may see, never widen it.
    #[must_use]
    pub fn renewed_by(&self, fresh: Grant) -> Grant {
        let symbols = match (&self.symbols, fresh.symbols) {
            (None, fresh) => fresh,
            (Some(own), None) => Some(own.clone()),
            (Some(own), Some(fresh)) if own.contains(names::ALL_SYMBOLS) => Some(fresh),
            (Some(own), Some(fresh)) if fresh.contains(names::ALL_SYMBOLS) => Some(own.clone()),
            (Some(own), Some(fresh)) => Some(own.intersection(&fresh).cloned().collect()),
        };
        Grant {
            symbols,
            expires_at: fresh.expires_at,
        }
    }

    /// How long until the grant ends, from `now`; `None` when it does not
    /// expire, or ends past what the clock can count (an `exp` near
    /// `u64::MAX`, on which `SystemTime` addition would panic).
    #[must_use]
    pub fn remaining(&self, now: std::time::SystemTime) -> Option<std::time::Duration> {
        let at = std::time::Duration::from_secs(self.expires_at?);
        let end = std::time::UNIX_EPOCH.checked_add(at)?;
        Some(end.duration_since(now).unwrap_or_default())
    }

    /// The initial subscriptions for this grant: the configured defaults the
    /// grant allows, with a disallowed `"*"` (or `"*@series"`) standing for
    /// every entitled symbol (in that series).
    #[must_use]
    pub fn initial_subscriptions(&self, defaults: &[String]) -> Vec<String> {
        let mut initial: BTreeSet<String> = defaults
            .iter()
            .filter(|s| self.allows(s))
            .cloned()
            .collect();
        if let Some(entitled) = &self.symbols
            && !self.allows(names::ALL_SYMBOLS)
        {
            let wildcards = defaults
                .iter()
                .map(|s| StreamName::split(s))
                .filter(|name| name.is_wildcard());
            for wildcard in wildcards {
                initial.extend(entitled.iter().map(|symbol| {
                    StreamName {
                        symbol,
                        series: wildcard.series,
                    }
                    .joined()
                }));
            }
        }
        initial.into_iter().collect()
    }
}

/// Why a socket was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in `Authorization: Bearer` or `?token=`.
    #[error("missing token: send Authorization: Bearer <token> or ?token=<token>")]
    Missing,
    /// The token is wrong, tampered with or malformed.
    #[error("invalid token")]
    Invalid,
    /// The JWT's `exp` has passed.
    #[error("token expired")]
    Expired,
    /// The JWT's `nbf` is still ahead (beyond the leeway).
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    /// The JWT's `iss` is not `auth.jwt_issuer`, or is missing when that is set.
    #[error("token issuer not accepted")]
    WrongIssuer,
    /// The JWT's `aud` does not include `auth.jwt_audience` (or names an
    /// audience when none is configured).
    #[error("token audience not accepted")]
    WrongAudience,
    /// The JWT's `sub` names another client code.
    #[error("token is for another client code")]
    WrongClient,
}

/// Largest clock skew `auth.jwt_leeway_seconds` may allow: one day.
const MAX_LEEWAY_SECONDS: u64 = 86_400;

/// Checks tokens according to `auth.mode`.
pub enum Authenticator {
    /// Everyone is admitted with every symbol.
    None,
    /// A fixed token per client code.
    Tokens(HashMap<String, String>),
    /// Signed JWTs.
    Jwt(Box<JwtCheck>),
}

/// How JWTs are verified.
pub struct JwtCheck {
    /// The verification key.
    key: DecodingKey,
    /// Algorithm, expiry and required claims.
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authenticator::None => f.write_str("Authenticator::None"),
            Authenticator::Tokens(tokens) => {
                write!(f, "Authenticator::Tokens({} client codes)", tokens.len())
            }
            Authenticator::Jwt(check) => {
                write!(f, "Authenticator::Jwt({:?})", check.validation.algorithms)
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    /// Required (and checked) by the validation.
    exp: u64,
    #[serde(default)]
    symbols: Option<Vec<String>>,
}

impl Authenticator {
    /// Builds the authenticator `[auth]` describes, reading key files.
    pub fn from_settings(settings: &AuthSettings) -> Result<Self, ConfigError> {
        let invalid = |key, message: String| ConfigError::Invalid { key, message };
        match settings.mode {
            AuthMode::None => Ok(Authenticator::None),
            AuthMode::Token => {
                let mut tokens = HashMap::new();
                for entry in &settings.tokens {
                    let Some((code, token)) = entry.split_once('=') else {
                        return Err(invalid(
                            "auth.tokens",
                            "entries are CLIENT_CODE=TOKEN".into(),
                        ));
                    };
                    if !names::is_client_code(code) || token.is_empty() {
                        return Err(invalid(
                            "auth.tokens",
                            format!(
                                "entry for {code:?} needs a valid client code and a non-empty token"
                            ),
                        ));
                    }
                    tokens.insert(code.to_owned(), token.to_owned());
                }
                if tokens.is_empty() {
                    return Err(invalid(
                        "auth.tokens",
                        "auth.mode = \"token\" needs at least one entry".into(),
                    ));
                }
                Ok(Authenticator::Tokens(tokens))
            }
            AuthMode::Jwt => {
                let algorithm = match settings.jwt_algorithm.as_str() {
                    "HS256" => Algorithm::HS256,
                    "RS256" => Algorithm::RS256,
                    "ES256" => Algorithm::ES256,
                    other => {
                        return Err(invalid(
                            "auth.jwt_algorithm",
                            format!("{other:?} is not one of HS256, RS256, ES256"),
                        ));
                    }
                };
                let key = if algorithm == Algorithm::HS256 {
                    if settings.jwt_secret.len() < 16 {
                        return Err(invalid(
                            "auth.jwt_secret",
                            "HS256 needs a secret of at least 16 bytes".into(),
                        ));
                    }
                    DecodingKey::from_secret(settings.jwt_secret.as_bytes())
                } else {
                    let path = &settings.jwt_public_key_file;
                    let pem = std::fs::read(path).map_err(|e| {
                        invalid(
                            "auth.jwt_public_key_file",
                            format!("cannot read {path:?}: {e}"),
                        )
                    })?;
                    let parsed = if algorithm == Algorithm::RS256 {
                        DecodingKey::from_rsa_pem(&pem)
                    } else {
                        DecodingKey::from_ec_pem(&pem)
                    };
                    parsed.map_err(|e| {
                        invalid(
                            "auth.jwt_public_key_file",
                            format!("not a PEM public key: {e}"),
                        )
                    })?
                };
                // jsonwebtoken subtracts the leeway from the clock: a huge
                // one would wrap around and admit anything.
                if settings.jwt_leeway_seconds > MAX_LEEWAY_SECONDS {
                    return Err(invalid(
                        "auth.jwt_leeway_seconds",
                        format!(
                            "must be at most {MAX_LEEWAY_SECONDS} (got {})",
                            settings.jwt_leeway_seconds
                        ),
                    ));
                }
                let mut validation = Validation::new(algorithm);
                let mut required = vec!["exp", "sub"];
                validation.validate_nbf = true;
                validation.leeway = settings.jwt_leeway_seconds;
                if !settings.jwt_issuer.is_empty() {
                    validation.set_issuer(&[&settings.jwt_issuer]);
                    required.push("iss");
                }
                // Unset, a token that names an audience is refused (RFC 7519
                // §4.1.3: we cannot tell whether we are in it).
                if !settings.jwt_audience.is_empty() {
                    validation.set_audience(&[&settings.jwt_audience]);
                    required.push("aud");
                }
                validation.set_required_spec_claims(&required);
                Ok(Authenticator::Jwt(Box::new(JwtCheck { key, validation })))
            }
        }
    }

    /// Whether any check is made at all.
    #[must_use]
    pub fn is_enabled(&self) -> bool {
        !matches!(self, Authenticator::None)
    }

    /// Checks `token` for `client_code`.
    pub fn authenticate(&self, client_code: &str, token: Option<&str>) -> Result<Grant, AuthError> {
        match self {
            Authenticator::None => Ok(Grant::default()),
            Authenticator::Tokens(tokens) => {
                let token = token.ok_or(AuthError::Missing)?;
                // Compare against something even for unknown codes, so the
                // time taken does not tell which codes exist.
                let expected = tokens.get(client_code).map_or("\u{0}", String::as_str);
                let equal: bool = expected.as_bytes().ct_eq(token.as_bytes()).into();
                if equal && tokens.contains_key(client_code) {
                    Ok(Grant::default())
                } else {
                    Err(AuthError::Invalid)
                }
            }
            Authenticator::Jwt(check) => {
                let token = token.ok_or(AuthError::Missing)?;
                let claims = jsonwebtoken::decode::<Claims>(token, &check.key, &check.validation)
                    .map_err(|e| match e.kind() {
                        ErrorKind::ExpiredSignature => AuthError::Expired,
                        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                        ErrorKind::InvalidAudience => AuthError::WrongAudience,
                        _ => AuthError::Invalid,
                    })?
                    .claims;
                if claims.sub != client_code {
                    return Err(AuthError::WrongClient);
                }
                Ok(Grant {
                    symbols: claims.symbols.map(|s| s.into_iter().collect()),
                    expires_at: Some(claims.exp.saturating_add(check.validation.leeway)),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn settings(mode: AuthMode) -> AuthSettings {
        AuthSettings {
            mode,
            tokens: vec!["acme=s3cret".into(), "beta=other".into()],
            jwt_algorithm: "HS256".into(),
            jwt_secret: SECRET.into(),
            jwt_public_key_file: String::new(),
            jwt_leeway_seconds: 0,
            jwt_issuer: String::new(),
            jwt_audience: String::new(),
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
    }

    fn jwt(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("sign")
    }

    #[test]
    fn none_admits_everyone_with_everything() {
        let auth = Authenticator::from_settings(&settings(AuthMode::None)).expect("valid");
        assert_eq!(auth.authenticate("x", None), Ok(Grant::default()));
        assert!(!auth.is_enabled());
    }

    #[test]
    fn tokens_are_per_client_code() {
        let auth = Authenticator::from_settings(&settings(AuthMode::Token)).expect("valid");
        assert!(auth.authenticate("acme", Some("s3cret")).is_ok());
        assert_eq!(
            auth.authenticate("acme", Some("s3cre")),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            auth.authenticate("acme", Some("other")),
            Err(AuthError::Invalid),
            "beta's token"
        );
        assert_eq!(
            auth.authenticate("nobody", Some("\u{0}")),
            Err(AuthError::Invalid)
        );
        assert_eq!(auth.authenticate("acme", None), Err(AuthError::Missing));
    }

    #[test]
    fn jwt_nbf_is_enforced_with_the_leeway() {
        let mut s = settings(AuthMode::Jwt);
        s.jwt_leeway_seconds = 30;
        let auth = Authenticator::from_settings(&s).expect("valid");
        let later = jwt(json!({"sub": "acme", "exp": now() + 7200, "nbf": now() + 3600}));
        assert_eq!(
            auth.authenticate("acme", Some(&later)),
            Err(AuthError::NotYetValid)
        );
        let skewed = jwt(json!({"sub": "acme", "exp": now() + 7200, "nbf": now() + 10}));
        assert_eq!(
            auth.authenticate("acme", Some(&skewed))
                .map(|grant| grant.symbols),
            Ok(None),
            "within the leeway"
        );
        let past = jwt(json!({"sub": "acme", "exp": now() + 60, "nbf": now() - 60}));
        assert!(auth.authenticate("acme", Some(&past)).is_ok());
    }

    #[test]
    fn jwt_issuer_and_audience_are_checked_when_configured() {
        let open = Authenticator::from_settings(&settings(AuthMode::Jwt)).expect("valid");
        let plain = jwt(json!({"sub": "acme", "exp": now() + 60}));
        let with_iss = jwt(json!({"sub": "acme", "exp": now() + 60, "iss": "https://idp"}));
        let with_aud = jwt(json!({"sub": "acme", "exp": now() + 60, "aud": "quotebridge"}));
        assert!(open.authenticate("acme", Some(&with_iss)).is_ok());
        assert_eq!(
            open.authenticate("acme", Some(&with_aud)),
            Err(AuthError::WrongAudience),
            "an audience we were not told we are"
        );

        let mut s = settings(AuthMode::Jwt);
        s.jwt_issuer = "https://idp".into();
        s.jwt_audience = "quotebridge".into();
        let strict = Authenticator::from_settings(&s).expect("valid");
        let both = jwt(json!({
            "sub": "acme", "exp": now() + 60, "iss": "https://idp", "aud": ["other", "quotebridge"]
        }));
        assert!(strict.authenticate("acme", Some(&both)).is_ok());
        let other_iss = jwt(json!({
            "sub": "acme", "exp": now() + 60, "iss": "https://evil", "aud": "quotebridge"
        }));
        assert_eq!(
            strict.authenticate("acme", Some(&other_iss)),
            Err(AuthError::WrongIssuer)
        );
        let other_aud = jwt(json!({
            "sub": "acme", "exp": now() + 60, "iss": "https://idp", "aud": "billing"
        }));
        assert_eq!(
            strict.authenticate("acme", Some(&other_aud)),
            Err(AuthError::WrongAudience)
        );
        // Required when configured: a token without them is refused.
        for missing in [plain, with_iss, with_aud] {
            assert!(strict.authenticate("acme", Some(&missing)).is_err());
        }
    }

    #[test]
    fn jwt_checks_signature_expiry_and_subject() {
        let auth = Authenticator::from_settings(&settings(AuthMode::Jwt)).expect("valid");
        let exp = now() + 60;
        let good = jwt(json!({"sub": "acme", "exp": exp}));
        let grant = Grant {
            expires_at: Some(exp),
            ..Grant::default()
        };
        assert_eq!(auth.authenticate("acme", Some(&good)), Ok(grant));
        assert_eq!(
            auth.authenticate("beta", Some(&good)),
            Err(AuthError::WrongClient)
        );
        let expired = jwt(json!({"sub": "acme", "exp": now() - 60}));
        assert_eq!(
            auth.authenticate("acme", Some(&expired)),
            Err(AuthError::Expired)
        );
        let no_exp = jwt(json!({"sub": "acme"}));
        assert_eq!(
            auth.authenticate("acme", Some(&no_exp)),
            Err(AuthError::Invalid)
        );
        let mut tampered = good.clone();
        tampered.pop();
        tampered.push(if good.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(
            auth.authenticate("acme", Some(&tampered)),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            auth.authenticate("acme", Some("not.a.jwt")),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn jwt_symbols_claim_becomes_entitlements() {
        let auth = Authenticator::from_settings(&settings(AuthMode::Jwt)).expect("valid");
        let token = jwt(json!({"sub": "acme", "exp": now() + 60, "symbols": ["MSFT", "AAPL"]}));
        let grant = auth.authenticate("acme", Some(&token)).expect("valid");
        assert!(grant.allows("AAPL") && !grant.allows("TSLA") && !grant.allows("*"));
        let defaults = vec!["*".to_owned(), "TSLA".to_owned()];
        assert_eq!(grant.initial_subscriptions(&defaults), vec!["AAPL", "MSFT"]);
        assert_eq!(
            Grant::default().initial_subscriptions(&defaults),
            vec!["*", "TSLA"]
        );
    }

    #[test]
    fn a_grant_ends_with_its_token_plus_the_leeway() {
        let mut lenient = settings(AuthMode::Jwt);
        lenient.jwt_leeway_seconds = 30;
        let auth = Authenticator::from_settings(&lenient).expect("valid");
        let exp = now() + 60;
        let grant = auth
            .authenticate("acme", Some(&jwt(json!({"sub": "acme", "exp": exp}))))
            .expect("valid");
        assert_eq!(grant.expires_at, Some(exp + 30));
        let at = |secs: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        assert_eq!(
            grant.remaining(at(exp)),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(
            grant.remaining(at(exp + 31)),
            Some(std::time::Duration::ZERO)
        );
        let forever = Grant {
            expires_at: Some(u64::MAX),
            ..Grant::default()
        };
        assert_eq!(
            forever.remaining(at(exp)),
            None,
            "past the clock: no end, no panic"
        );
        let tokens = Authenticator::from_settings(&settings(AuthMode::Token)).expect("valid");
        let fixed = tokens.authenticate("acme", Some("s3cret"));
        assert_eq!(fixed.map(|grant| grant.expires_at), Ok(None), "never ends");
    }

    #[test]
    fn a_renewed_grant_narrows_and_never_widens() {
        let set = |symbols: &[&str]| Some(symbols.iter().map(|s| (*s).to_owned()).collect());
        let grant = |symbols: Option<BTreeSet<String>>, expires_at| Grant {
            symbols,
            expires_at: Some(expires_at),
        };
        let all = grant(None, 10);
        let some = grant(set(&["AAPL", "MSFT"]), 10);
        let renewed = some.renewed_by(grant(None, 20));
        assert_eq!(
            renewed,
            grant(set(&["AAPL", "MSFT"]), 20),
            "not widened to all"
        );
        let renewed = some.renewed_by(grant(set(&["MSFT", "TSLA"]), 20));
        assert_eq!(renewed, grant(set(&["MSFT"]), 20), "what both allow");
        let renewed = all.renewed_by(grant(set(&["TSLA"]), 20));
        assert_eq!(renewed, grant(set(&["TSLA"]), 20), "narrowed");
        let star = grant(set(&["*"]), 10);
        assert_eq!(
            star.renewed_by(grant(set(&["TSLA"]), 20)),
            grant(set(&["TSLA"]), 20)
        );
        assert_eq!(
            some.renewed_by(grant(set(&["*"]), 20)),
            grant(set(&["AAPL", "MSFT"]), 20)
        );
    }

    #[test]
    fn bad_settings_name_their_key() {
        let mut s = settings(AuthMode::Jwt);
        s.jwt_secret = "short".into();
        let err = Authenticator::from_settings(&s).expect_err("short secret");
        assert!(err.to_string().contains("auth.jwt_secret"), "{err}");
        let mut huge_leeway = settings(AuthMode::Jwt);
        huge_leeway.jwt_leeway_seconds = u64::MAX;
        let err = Authenticator::from_settings(&huge_leeway).expect_err("leeway bound");
        assert!(err.to_string().contains("auth.jwt_leeway_seconds"), "{err}");
        s.jwt_algorithm = "RS256".into();
        s.jwt_public_key_file = "/nonexistent.pem".into();
        let err = Authenticator::from_settings(&s).expect_err("missing key file");
        assert!(err.to_string().contains("auth.jwt_public_key_file"));
        let mut s = settings(AuthMode::Token);
        s.tokens = vec!["no-equals-sign".into()];
        assert!(
            Authenticator::from_settings(&s)
                .expect_err("bad entry")
                .to_string()
                .contains("auth.tokens")
        );
        // Secrets never show in Debug.
        let auth = Authenticator::from_settings(&settings(AuthMode::Token)).expect("valid");
        assert!(!format!("{auth:?}").contains("s3cret"));
        assert!(!format!("{:?}", settings(AuthMode::Token)).contains("s3cret"));
    }
}
