//! Where a config mistake is: the file (or the fleet document layered over it), the line and
//! column, and the field, so every error points at the one place to fix.

use std::ops::Range;

/// A config that could not be loaded: which file, where in it, and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}{location}: {message}")]
pub struct ConfigError {
    pub(crate) file: String,
    /// ":LINE:COLUMN" (1-based) when the mistake has a place in the file, else empty.
    pub(crate) location: String,
    pub(crate) message: String,
}

/// The text a config was parsed from, for turning spans into file:line:column.
pub(super) struct Source<'a> {
    pub(super) text: &'a str,
    pub(super) file: &'a str,
    /// A fleet document layered over `text`, and the top-level sections it supplied: errors
    /// in those sections point into it.
    pub(super) overlay: Option<(&'a str, &'a str, Vec<&'static str>)>,
}

impl<'a> Source<'a> {
    pub(super) fn new(text: &'a str, file: &'a str) -> Source<'a> {
        Source {
            text,
            file,
            overlay: None,
        }
    }

    /// The text and name a field's section came from.
    fn origin(&self, field: &str) -> (&'a str, &'a str) {
        let section = field.split(['.', ' ']).next().unwrap_or("");
        match &self.overlay {
            Some((text, file, sections)) if sections.contains(&section) => (text, file),
            _ => (self.text, self.file),
        }
    }

    fn line_col(text: &str, offset: usize) -> (usize, usize) {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before
            .rfind('\n')
            .map_or(before.len(), |nl| before.len() - nl - 1)
            + 1;
        (line, col)
    }

    pub(super) fn error_at(
        &self,
        span: Option<Range<usize>>,
        field: &str,
        message: impl ToString,
    ) -> ConfigError {
        let message = message.to_string();
        let (text, file) = self.origin(field);
        let location = span
            .map(|s| {
                let (line, col) = Source::line_col(text, s.start);
                format!(":{line}:{col}")
            })
            .unwrap_or_default();
        let message = if field.is_empty() {
            message
        } else {
            format!("field `{field}`: {message}")
        };
        ConfigError {
            file: file.to_string(),
            location,
            message,
        }
    }

    /// Turns a TOML/serde error into one line naming the field found at its position.
    pub(super) fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let span = e.span();
        let field = span
            .as_ref()
            .and_then(|s| {
                let line_start = self.text[..s.start.min(self.text.len())]
                    .rfind('\n')
                    .map_or(0, |i| i + 1);
                let line = self.text[line_start..].lines().next().unwrap_or("");
                let line = line.trim();
                if line.starts_with('[') {
                    Some(
                        line.trim_matches(|c| c == '[' || c == ']')
                            .trim()
                            .to_string(),
                    )
                } else {
                    line.split_once('=').map(|(k, _)| k.trim().to_string())
                }
            })
            .unwrap_or_default();
        let message = e.message().trim().replace('\n', " ");
        self.error_at(span, &field, message)
    }
}
