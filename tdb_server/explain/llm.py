"""An optional explainer that asks an OpenAI-compatible chat endpoint. Off by default, never required.

Configured only by the environment of the server:

| variable               | meaning                                                        |
|------------------------|----------------------------------------------------------------|
| `TDB_EXPLAINER_URL`    | base URL, e.g. `https://api.example.com/v1` (POST {url}/chat/completions) |
| `TDB_EXPLAINER_KEY`    | bearer token (optional: local servers often need none)        |
| `TDB_EXPLAINER_MODEL`  | model name sent in the request (default `gpt-4o-mini`)         |
| `TDB_EXPLAINER_TIMEOUT`| seconds (default 30)                                           |

Only the unit's records (text windows with the strongest activations marked) and the local
explanation go out. Any failure (not configured, unreachable, an HTTP error, an unexpected answer)
is returned as a polite message, never raised: the local explanation still stands.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from tdb_server.records.records import Records

DEFAULT_MODEL = "gpt-4o-mini"
MAX_WINDOWS = 10


@dataclass
class LlmAnswer:
    text: str          # the explanation ("" on failure)
    error: str = ""    # why there is none, for the user


def configured() -> bool:
    return bool(os.environ.get("TDB_EXPLAINER_URL"))


def prompt(records: Records, local_text: str) -> str:
    lines = [f"A component of a language model ({records.unit}) was run over text. In each excerpt the tokens "
             "where it is most active are marked [[like this]] with the activation. In one short sentence, say "
             "what the component responds to.", ""]
    for w in records.top[:MAX_WINDOWS]:
        peak = w.max_act
        parts = [f"[[{t}]]({a:.2f})" if peak > 0 and a >= 0.5 * peak else t for t, a in zip(w.tokens, w.acts)]
        lines.append("- " + "".join(parts).replace("\n", " "))
    lines += ["", f"A statistical summary says: {local_text}"]
    return "\n".join(lines)


def explain_llm(records: Records, local_text: str) -> LlmAnswer:
    url = os.environ.get("TDB_EXPLAINER_URL", "").rstrip("/")
    if not url:
        return LlmAnswer("", "the LLM explainer is off: set TDB_EXPLAINER_URL (and TDB_EXPLAINER_KEY) on the "
                             "server to use an OpenAI-compatible endpoint")
    body = {"model": os.environ.get("TDB_EXPLAINER_MODEL", DEFAULT_MODEL), "temperature": 0, "max_tokens": 120,
            "messages": [{"role": "system", "content": "You explain what neurons and features of language models do."},
                         {"role": "user", "content": prompt(records, local_text)}]}
    headers = {"Content-Type": "application/json"}
    if os.environ.get("TDB_EXPLAINER_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['TDB_EXPLAINER_KEY']}"
    req = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(), headers=headers,
                                 method="POST")
    try:
        timeout = float(os.environ.get("TDB_EXPLAINER_TIMEOUT", "30"))
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read().decode("utf-8"))
        text = answer["choices"][0]["message"]["content"].strip()
        if not text:
            return LlmAnswer("", f"the LLM explainer at {url} answered with an empty explanation")
        return LlmAnswer(text)
    except urllib.error.HTTPError as e:
        return LlmAnswer("", f"the LLM explainer at {url} answered HTTP {e.code} ({e.reason}); the local explanation "
                             "is shown instead")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        return LlmAnswer("", f"could not reach the LLM explainer at {url} ({reason}); the local explanation is shown "
                             "instead")
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return LlmAnswer("", f"the LLM explainer at {url} gave an answer tdb could not read ({type(e).__name__}); "
                             "the local explanation is shown instead")
