//! The Amazon MSK IAM token: what a Kafka client gives an MSK cluster with IAM access control
//! as its SASL/OAUTHBEARER token. It is the URL
//! `https://kafka.<region>.amazonaws.com/?Action=kafka-cluster%3AConnect` presigned with SigV4
//! (`aws-sigv4`, signing name `kafka-cluster`, valid for [`EXPIRES`]), then a `User-Agent`
//! parameter, all base64url-encoded without padding: byte for byte what AWS's own signer
//! (aws-msk-iam-sasl-signer-python) makes, which the golden tests below hold it to.
//!
//! The token is a bearer credential while it is valid: this module never logs it, the signed
//! URL or the credentials, and its errors never contain them. (aws-sigv4 itself traces the
//! canonical request, session token included, at `trace` level: never enable that in production.)

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use base64::Engine;
use std::time::{Duration, SystemTime};

/// How long a token is valid (the signers' fixed 15 minutes).
pub(crate) const EXPIRES: Duration = Duration::from_secs(900);

/// The `User-Agent` parameter edgeship's tokens carry.
pub(crate) const USER_AGENT: &str = concat!("edgeship/", env!("CARGO_PKG_VERSION"));

/// The presigned query parameters in the order AWS's signer writes them: the session token
/// before the signature (aws-sigv4 gives it after).
const ORDER: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Security-Token",
    "X-Amz-Signature",
];

/// The token for the cluster's `region`, signed with `credentials` at `at`; `user_agent`
/// names the client in the URL's last (unsigned) parameter.
pub(crate) fn token(
    region: &str,
    credentials: &Credentials,
    at: SystemTime,
    user_agent: &str,
) -> Result<String, String> {
    let valid = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
    if region.is_empty() || !region.bytes().all(valid) {
        return Err(format!("MSK IAM token: `{region}` is not an AWS region"));
    }
    let url = format!("https://kafka.{region}.amazonaws.com/?Action=kafka-cluster%3AConnect");
    let identity = credentials.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(EXPIRES);
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("kafka-cluster")
        .time(at)
        .settings(settings)
        .build()
        .map_err(|e| format!("MSK IAM token: {e}"))?
        .into();
    let signable = SignableRequest::new(
        "GET",
        url.as_str(),
        std::iter::empty::<(&str, &str)>(),
        SignableBody::empty(),
    )
    .map_err(|e| format!("MSK IAM token: {e}"))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| format!("MSK IAM token: {e}"))?
        .into_parts();
    let mut query: Vec<_> = instructions.params().iter().collect();
    query.sort_by_key(|(name, _)| ORDER.iter().position(|o| o == name).unwrap_or(ORDER.len()));
    let mut signed = url;
    for (name, value) in query {
        signed.push('&');
        signed.push_str(name);
        signed.push('=');
        signed.push_str(&quote(value, false));
    }
    signed.push_str("&User-Agent=");
    signed.push_str(&quote(user_agent, true));
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signed))
}

/// Percent-encodes all but RFC 3986's unreserved characters, as Python's `quote` does in the
/// signer (and aws-sigv4 in the canonical request); with `plus`, a space becomes `+`, as
/// `quote_plus` does to the User-Agent.
fn quote(s: &str, plus: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(b))
            }
            b' ' if plus => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    // Made by aws-msk-iam-sasl-signer-python 1.0.2 with the inputs below; regenerate with
    // `tests/support/.venv/bin/python3 tests/support/msk_iam_golden.py` (a venv with
    // tests/support/requirements.txt installed).
    const SIGNER_USER_AGENT: &str = "aws-msk-iam-sasl-signer-python/1.0.2";
    const WITH_SESSION_TOKEN: &str =
        "aHR0cHM6Ly9rYWZrYS5ldS13ZXN0LTEuYW1hem9uYXdzLmNvbS8_QWN0aW9uPWthZmthLWNsdXN0ZXIlM0FDb25uZWN0JlgtQW16LUFsZ29yaXRobT1BV1M0LUhNQUMtU0hBMjU2JlgtQW16LUNyZWRlbnRpYWw9QUtJREVYQU1QTEUlMkYyMDI2MTIwMyUyRmV1LXdlc3QtMSUyRmthZmthLWNsdXN0ZXIlMkZhd3M0X3JlcXVlc3QmWC1BbXotRGF0ZT0yMDI2MTIwM1QxMjAwMDBaJlgtQW16LUV4cGlyZXM9OTAwJlgtQW16LVNpZ25lZEhlYWRlcnM9aG9zdCZYLUFtei1TZWN1cml0eS1Ub2tlbj1Gd29HWlhJdllYZHpFWEFNUExFVE9LRU4mWC1BbXotU2lnbmF0dXJlPWRkM2IwNTY1YTM4YTQ5MGE4ZThhZTVlZDk0NjM4YzhmM2YyOTgxMzhhZjI3YTg2ODk4MmM0YTI1MjljOTc2YjMmVXNlci1BZ2VudD1hd3MtbXNrLWlhbS1zYXNsLXNpZ25lci1weXRob24lMkYxLjAuMg";
    const WITHOUT_SESSION_TOKEN: &str =
        "aHR0cHM6Ly9rYWZrYS5ldS13ZXN0LTEuYW1hem9uYXdzLmNvbS8_QWN0aW9uPWthZmthLWNsdXN0ZXIlM0FDb25uZWN0JlgtQW16LUFsZ29yaXRobT1BV1M0LUhNQUMtU0hBMjU2JlgtQW16LUNyZWRlbnRpYWw9QUtJREVYQU1QTEUlMkYyMDI2MTIwMyUyRmV1LXdlc3QtMSUyRmthZmthLWNsdXN0ZXIlMkZhd3M0X3JlcXVlc3QmWC1BbXotRGF0ZT0yMDI2MTIwM1QxMjAwMDBaJlgtQW16LUV4cGlyZXM9OTAwJlgtQW16LVNpZ25lZEhlYWRlcnM9aG9zdCZYLUFtei1TaWduYXR1cmU9ZTI4ZGFmOGQ3YTZlMWYxNzU0YTUzMjc5MTI3YTRmYjkzNmFiNTM3ZDJhZmI3MDZkOTg2NmZjMjM1NTYzMTFkMSZVc2VyLUFnZW50PWF3cy1tc2staWFtLXNhc2wtc2lnbmVyLXB5dGhvbiUyRjEuMC4y";
    const WITH_RESERVED_SESSION_TOKEN: &str =
        "aHR0cHM6Ly9rYWZrYS5ldS13ZXN0LTEuYW1hem9uYXdzLmNvbS8_QWN0aW9uPWthZmthLWNsdXN0ZXIlM0FDb25uZWN0JlgtQW16LUFsZ29yaXRobT1BV1M0LUhNQUMtU0hBMjU2JlgtQW16LUNyZWRlbnRpYWw9QUtJREVYQU1QTEUlMkYyMDI2MTIwMyUyRmV1LXdlc3QtMSUyRmthZmthLWNsdXN0ZXIlMkZhd3M0X3JlcXVlc3QmWC1BbXotRGF0ZT0yMDI2MTIwM1QxMjAwMDBaJlgtQW16LUV4cGlyZXM9OTAwJlgtQW16LVNpZ25lZEhlYWRlcnM9aG9zdCZYLUFtei1TZWN1cml0eS1Ub2tlbj1Gd29HWlhJdllYZHolMkZFWEFNUExFJTJCVE9LRU4lM0QlM0QmWC1BbXotU2lnbmF0dXJlPWU0NTFkMGFmY2Q2MzYzMDM5NjA5MjM3OTYxZjliMTRlYjUyMTI3YTg4YmJkOWNlMjkyZTJhNDdkZTdkNmVkMDImVXNlci1BZ2VudD1hd3MtbXNrLWlhbS1zYXNsLXNpZ25lci1weXRob24lMkYxLjAuMg";

    fn credentials(session_token: Option<&str>) -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            session_token.map(str::to_string),
            None,
            "test",
        )
    }

    /// 2026-12-03T12:00:00Z.
    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_796_299_200)
    }

    #[test]
    fn matches_the_aws_signer() {
        for (session_token, golden) in [
            (Some("FwoGZXIvYXdzEXAMPLETOKEN"), WITH_SESSION_TOKEN),
            (None, WITHOUT_SESSION_TOKEN),
            (
                Some("FwoGZXIvYXdz/EXAMPLE+TOKEN=="),
                WITH_RESERVED_SESSION_TOKEN,
            ),
        ] {
            let made = token(
                "eu-west-1",
                &credentials(session_token),
                at(),
                SIGNER_USER_AGENT,
            );
            assert_eq!(
                made.as_deref(),
                Ok(golden),
                "session token {session_token:?}"
            );
        }
    }

    #[test]
    fn decodes_to_the_presigned_connect_url() {
        let made = token(
            "eu-west-1",
            &credentials(Some("FwoGZXIvYXdzEXAMPLETOKEN")),
            at(),
            "edgeship/0.1 (test)",
        )
        .expect("token");
        assert!(made
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(made)
            .expect("base64url");
        let url = String::from_utf8(url).expect("UTF-8");
        let query = url
            .strip_prefix("https://kafka.eu-west-1.amazonaws.com/?")
            .expect("MSK's regional host");
        let params: Vec<&str> = query.split('&').collect();
        assert_eq!(params[0], "Action=kafka-cluster%3AConnect");
        assert!(params.contains(&"X-Amz-Expires=900"));
        assert!(params.contains(&"X-Amz-Date=20261203T120000Z"));
        assert_eq!(params.last(), Some(&"User-Agent=edgeship%2F0.1+%28test%29"));
    }

    #[test]
    fn refuses_what_is_not_a_region() {
        let credentials = credentials(None);
        for region in ["", "eu-west-1.example.com/#", "EU-WEST-1"] {
            assert!(
                token(region, &credentials, at(), "edgeship").is_err(),
                "{region:?}"
            );
        }
    }
}
