//! `[aws]`: where AWS credentials come from.

use super::raw::{self, RawAws};
use super::source::{ConfigError, Source};
use crate::aws::iot_credentials::IotCredentialsConfig;
use crate::aws::AwsConfig;
use crate::tls::TlsConfig;
use std::path::PathBuf;

pub(super) fn aws(raw: RawAws, gateway_id: &str, src: &Source) -> Result<AwsConfig, ConfigError> {
    Ok(AwsConfig {
        iot_credentials: match raw.iot_credentials {
            Some(iot) => Some(iot_credentials(iot, gateway_id, src)?),
            None => None,
        },
    })
}

fn iot_credentials(
    raw: toml::Spanned<raw::RawIotCredentials>,
    gateway_id: &str,
    src: &Source,
) -> Result<IotCredentialsConfig, ConfigError> {
    let span = raw.span();
    let raw = raw.into_inner();
    let field = "aws.iot_credentials";
    let endpoint = if raw.endpoint.starts_with("https://") {
        raw.endpoint.trim_end_matches('/').to_string()
    } else if raw.endpoint.contains("://") {
        return Err(src.error_at(
            Some(span),
            &format!("{field}.endpoint"),
            format!("`{}` must be a host name or an https:// URL", raw.endpoint),
        ));
    } else {
        format!("https://{}", raw.endpoint.trim_end_matches('/'))
    };
    if endpoint.len() <= "https://".len() {
        return Err(src.error_at(
            Some(span),
            &format!("{field}.endpoint"),
            "must not be empty",
        ));
    }
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:=@,+".contains(c))
    };
    if !name_ok(&raw.role_alias) {
        return Err(src.error_at(
            Some(span),
            &format!("{field}.role_alias"),
            format!("`{}` is not a role alias name", raw.role_alias),
        ));
    }
    let thing_name = raw.thing_name.unwrap_or_else(|| gateway_id.to_string());
    if !name_ok(&thing_name) {
        return Err(src.error_at(
            Some(span),
            &format!("{field}.thing_name"),
            format!("`{thing_name}` is not a thing name"),
        ));
    }
    Ok(IotCredentialsConfig {
        endpoint,
        role_alias: raw.role_alias,
        thing_name,
        tls: TlsConfig {
            ca_file: raw.ca_file.map(PathBuf::from),
            client_cert: Some(PathBuf::from(raw.cert)),
            client_key: Some(PathBuf::from(raw.key)),
            alpn: Vec::new(),
        },
    })
}
