#!/usr/bin/env python3
"""Mint an HS256 token for envoy/plans.yaml's demo secret: demo-jwt.py SUBJECT PLAN [SECONDS]."""
import base64
import hashlib
import hmac
import json
import sys
import time

SECRET = b"ratelimit-wasm-demo-secret-not-for-production"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(sub: str, plan: str, ttl: int = 3600) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "demo"}).encode())
    claims = {"iss": "ratelimit-wasm-demo", "sub": sub, "plan": plan, "exp": int(time.time()) + ttl}
    payload = b64(json.dumps(claims).encode())
    signature = hmac.new(SECRET, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: demo-jwt.py SUBJECT PLAN [SECONDS]")
    print(mint(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3600))
