"""A container credentials endpoint for the tests, as EKS Pod Identity's agent and ECS serve one:
GET with the pod's token in `Authorization` answers temporary keys as JSON (AccessKeyId,
SecretAccessKey, Token, Expiration). Like awslabs' amazon-ecs-local-container-endpoints, it
gets the keys from a real STS (here moto's, AssumeRoleWithWebIdentity), so moto's S3, with
request authentication on, verifies every signature made with them; nothing is made up here.

    python3 tests/moto/container_credentials.py PORT STS_URL ROLE_ARN TOKEN DURATION_SECONDS

A request without the token, or with another one, is refused (401), as the real agents do.
"""
import json
import sys
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, STS, ROLE, TOKEN, DURATION = sys.argv[1:6]
NS = {"s": "https://sts.amazonaws.com/doc/2011-06-15/"}


def assume_role():
    form = urllib.parse.urlencode(
        {
            "Action": "AssumeRoleWithWebIdentity",
            "Version": "2011-06-15",
            "RoleArn": ROLE,
            "RoleSessionName": "pod-identity",
            "WebIdentityToken": TOKEN,
            "DurationSeconds": DURATION,
        }
    ).encode()
    with urllib.request.urlopen(urllib.request.Request(STS, data=form), timeout=10) as r:
        root = ET.fromstring(r.read())
    creds = root.find(".//s:Credentials", NS)
    get = lambda name: creds.find(f"s:{name}", NS).text  # noqa: E731
    return {
        "AccessKeyId": get("AccessKeyId"),
        "SecretAccessKey": get("SecretAccessKey"),
        "Token": get("SessionToken"),
        "Expiration": get("Expiration"),
        "AccountId": "123456789012",
    }


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.headers.get("Authorization") != TOKEN:
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"code":"AccessDeniedException","message":"bad token"}')
            return
        body = json.dumps(assume_role()).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(PORT)), Handler).serve_forever()
