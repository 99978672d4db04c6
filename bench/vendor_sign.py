"""The vendor's way of getting a token (sign_jwt.py from the Skykit API
authentication docs, python-jose reading private.pem), which bench/run.sh
times against `skykit-agent token` with hyperfine.

It is the vendor's example as published, except that the key file and the
issuer come from the command line:

    python bench/vendor_sign.py PRIVATE_PEM ISSUER
"""

import sys
from datetime import datetime

from jose import jwt


def seconds_since_epoch():
    epoch = datetime.utcfromtimestamp(0)
    now = datetime.utcnow()
    now_epoch_delta = now - epoch
    return int(now_epoch_delta.total_seconds())


def generate_access_token(key_path, issuer):
    with open(key_path) as f:
        private_key = f.read()
    now_epoch_seconds = seconds_since_epoch()
    claims = {
        'iss': issuer,
        'iat': now_epoch_seconds,
        'exp': now_epoch_seconds + 3600,
    }
    return jwt.encode(claims, private_key, algorithm='RS256')


if __name__ == '__main__':
    print(generate_access_token(sys.argv[1], sys.argv[2]))
