"""moto's server for the web identity tests: STS and S3 in one process, with request
authentication on after the first INITIAL_NO_AUTH_ACTION_COUNT calls (the tests' set-up), so
S3 verifies every SigV4 signature against the keys its STS issued.

One deviation of moto from AWS is corrected: AWS STS takes AssumeRoleWithWebIdentity unsigned
(the web identity token is the proof, and the caller has no keys yet), while moto 5 asks it for
a signature once authentication is on and fails with a 500. That one action skips the check.

    python3 tests/moto/server.py PORT
"""
import sys

from moto.core.authorization import ActionAuthenticatorMixin

_check = ActionAuthenticatorMixin._authenticate_and_authorize_normal_action


def _unsigned_web_identity(self, resource="*"):
    if self._get_action() == "AssumeRoleWithWebIdentity":
        return None
    return _check(self, resource)


ActionAuthenticatorMixin._authenticate_and_authorize_normal_action = _unsigned_web_identity

from moto.server import main  # noqa: E402  (after the patch)

if __name__ == "__main__":
    main(["-H", "127.0.0.1", "-p", sys.argv[1]])
