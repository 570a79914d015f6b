//! What Kinesis' answers mean for the shipper: its error codes and messages, classified into
//! [`FailureKind`]s. The only place the service's codes are read.

use crate::sink::call::FailureKind;

/// The kind of an entry's or a call's failure, from the service's code, HTTP status (0 for a
/// failure inside an answer) and message.
pub(crate) fn classify(code: &str, status: u16, message: &str) -> FailureKind {
    if is_throttle(code) {
        return FailureKind::Throttled;
    }
    if let Some(limit) = record_size_limit(code, message) {
        return FailureKind::TooLarge { limit };
    }
    match code {
        "InternalFailure" | "ServiceUnavailable" | "ServiceUnavailableException" => {
            FailureKind::Transient
        }
        "ResourceNotFoundException"
        | "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "MissingAuthenticationToken"
        | "KMSAccessDeniedException"
        | "KMSDisabledException"
        | "KMSInvalidStateException"
        | "KMSNotFoundException"
        | "KMSOptInRequired"
        | "ValidationException"
        | "InvalidArgumentException" => FailureKind::Refused,
        _ if status >= 500 || status == 0 => FailureKind::Transient,
        _ => FailureKind::Refused,
    }
}

/// Error codes that mean "too fast, slow down" rather than "broken".
fn is_throttle(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException"
            | "LimitExceededException"
            | "ThrottlingException"
            | "KMSThrottlingException"
    )
}

/// The record size limit a refusal names, if it refuses a record for its size: kinesis-mock
/// and streams with a raised limit answer the entry with `InvalidArgumentException` "Record
/// data size N exceeds the stream's max record size of M bytes"; request validation answers
/// `ValidationException` "... data ... length less than or equal to M".
fn record_size_limit(code: &str, message: &str) -> Option<u64> {
    let number_after = |marker: &str| -> Option<u64> {
        let rest = &message[message.find(marker)? + marker.len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    match code {
        "InvalidArgumentException" => number_after("max record size of"),
        "ValidationException" if message.contains("data") => {
            number_after("length less than or equal to")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_refusals_name_their_limit() {
        assert_eq!(
            classify(
                "InvalidArgumentException",
                0,
                "Record data size 1048586 exceeds the stream's max record size of 1048576 bytes"
            ),
            FailureKind::TooLarge { limit: 1_048_576 }
        );
        assert_eq!(
            classify(
                "ValidationException",
                400,
                "1 validation error detected: Value at 'records.1.member.data' failed to satisfy constraint: Member must have length less than or equal to 1048576"
            ),
            FailureKind::TooLarge { limit: 1_048_576 }
        );
        assert_eq!(
            classify("InvalidArgumentException", 400, "Stream s not found"),
            FailureKind::Refused
        );
        assert_eq!(
            classify(
                "ProvisionedThroughputExceededException",
                0,
                "max record size of 5"
            ),
            FailureKind::Throttled
        );
    }

    #[test]
    fn codes_sort_into_kinds() {
        assert_eq!(
            classify("LimitExceededException", 400, ""),
            FailureKind::Throttled
        );
        assert_eq!(classify("InternalFailure", 0, ""), FailureKind::Transient);
        assert_eq!(classify("Http502", 502, ""), FailureKind::Transient);
        assert_eq!(
            classify("ResourceNotFoundException", 400, ""),
            FailureKind::Refused
        );
        assert_eq!(classify("Whatever", 403, ""), FailureKind::Refused);
    }
}
