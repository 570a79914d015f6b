"""Golden values for the Amazon MSK IAM (SASL/OAUTHBEARER) token that agent/sink/kafka/msk_iam.rs
makes, produced by AWS's own signer, aws-msk-iam-sasl-signer-python (pinned in requirements.txt),
with fixed credentials and a fixed signing time.

    tests/support/.venv/bin/python3 tests/support/msk_iam_golden.py

(the venv scripts/test.sh makes from requirements.txt; any venv with the pinned signer will do)

prints {"cases": [{"name", "token", "url", "user_agent"}...]}: one case with a session token,
one without, one with a session token holding `/`, `+` and `=`. The token comes from the
library's public generate_auth_token_from_credentials_provider (with a provider returning fixed
botocore Credentials); the clock is frozen by patching botocore.auth.get_current_datetime, the
only clock SigV4QueryAuth reads (the library itself only parses X-Amz-Date back out of the URL).
"""

import base64
import datetime
import json
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import botocore.auth
from botocore.credentials import CredentialProvider, Credentials
from aws_msk_iam_sasl_signer import MSKAuthTokenProvider

REGION = "eu-west-1"
ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLETOKEN"
# Real STS session tokens are base64, with `/`, `+` and `=`, which the URL must percent-encode.
RESERVED_SESSION_TOKEN = "FwoGZXIvYXdz/EXAMPLE+TOKEN=="
# 2026-12-03T12:00:00Z; botocore wants a naive UTC datetime.
SIGNING_TIME = datetime.datetime(2026, 12, 3, 12, 0, 0)


class Fixed(CredentialProvider):
    METHOD = "fixed"

    def __init__(self, token):
        super().__init__()
        self.token = token

    def load(self):
        return Credentials(ACCESS_KEY, SECRET_KEY, self.token)


def case(name, session_token):
    with mock.patch.object(botocore.auth, "get_current_datetime", lambda *a, **k: SIGNING_TIME):
        token, expiry_ms = MSKAuthTokenProvider.generate_auth_token_from_credentials_provider(
            REGION, Fixed(session_token)
        )
    url = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("utf-8")
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Date"] == ["20261203T120000Z"], query["X-Amz-Date"]
    signed_at = int(SIGNING_TIME.replace(tzinfo=datetime.timezone.utc).timestamp())
    assert expiry_ms == (signed_at + 900) * 1000, expiry_ms
    # The module-level helper the library builds its User-Agent parameter with.
    user_agent = getattr(MSKAuthTokenProvider, "__get_user_agent__")()
    assert query["User-Agent"] == [user_agent], query["User-Agent"]
    return {"name": name, "token": token, "url": url, "user_agent": user_agent}


def main():
    cases = [
        case("session_token", SESSION_TOKEN),
        case("no_session_token", None),
        case("reserved_session_token", RESERVED_SESSION_TOKEN),
    ]
    print(json.dumps({"cases": cases}, indent=2))


if __name__ == "__main__":
    main()
