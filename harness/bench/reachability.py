"""Whether the places a first run downloads from answer, checked by ``harness validate`` before
any long work, so that a cold start on a machine without access fails in seconds, saying which
source and why, rather than after the fine-tuning has been planned.

A source is reachable when an HTTP(S) request for its URL gets any answer from the server (even
an error status: the host and the path's server are there); it is not when the name does not
resolve, the connection is refused or times out, or TLS fails. Proxies from the environment are
used as pip and apt would use them.
"""

from __future__ import annotations

import urllib.error
import urllib.request

TIMEOUT_S = 10.0


def probe(url: str, timeout: float = TIMEOUT_S) -> str | None:
    """None if ``url``'s server answers, else why not (one line)."""
    request = urllib.request.Request(url, method="HEAD",
                                     headers={"User-Agent": "merge-harness validate"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None                 # the server answered, with a status of its own
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        return f"{type(reason).__name__}: {reason}"
