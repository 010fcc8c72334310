"""The OpenAPI 3.1 description of /api/v1/, served at /api/v1/openapi.json (and kept, generated,
in docs/openapi.json)."""
from __future__ import annotations

from .. import __version__

_ERR = {"description": "Error", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(ref: str, desc: str) -> dict:
    return {"description": desc, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{ref}"}}}}


_ACTION = {"name": "action", "in": "path", "required": True,
           "schema": {"type": "string", "enum": ["delete", "hold", "release", "retry"]}}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
       "description": "Queue id, e.g. P1234T1764457200C123456@host"}


def openapi() -> dict:
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "MailEngine HTTP API", "version": __version__,
                 "description": (
                     "Inject mail, query and act on the queue, read statistics. Authenticate "
                     "with 'Authorization: Bearer TOKEN' (tokens: HOME/api-tokens.txt, made on "
                     "the web admin's API tokens page). Only clients allowed by network.web_ip "
                     "reach the port. After a wrong token the client address is refused (429) "
                     "for a time that doubles with each failure in a row.")},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/messages": {"post": {
                "summary": "Inject one message for one or many recipients",
                "description": (
                    "Stored in the spool like mail received by SMTP (on disk, fsync'ed, "
                    "before the 202). Without substitutions one message is stored for all "
                    "recipients; with substitutions (or defaults) each recipient gets a "
                    "personal copy in which {{key}} is replaced ({{to}} is the recipient)."),
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Inject"},
                    "examples": {
                        "parts": {"value": {
                            "from": "news@example.org", "to": ["a@example.com"],
                            "headers": {"Subject": "Hello", "From": "News <news@example.org>"},
                            "body": "Hello!\n"}},
                        "personal": {"value": {
                            "from": "news@example.org",
                            "to": ["ann@example.com", "bob@example.net"],
                            "headers": {"Subject": "Hi {{name}}"}, "body": "Dear {{name}},\n",
                            "substitutions": {"ann@example.com": {"name": "Ann"}},
                            "defaults": {"name": "reader"}}},
                        "raw": {"value": {
                            "from": "app@example.org", "to": ["x@example.com"],
                            "raw": "From: app@example.org\r\nSubject: raw\r\n\r\nbody\r\n"}}}}}},
                "responses": {"202": _json("Injected", "Stored; the queue ids"),
                              "200": _json("Injected", "Every recipient is suppressed: "
                                                       "nothing stored"),
                              "400": _ERR, "401": _ERR, "403": _ERR, "429": _ERR,
                              "503": _ERR}}},
            "/api/v1/stats": {"get": {
                "summary": "Counters, queue size, connections, busiest destinations",
                "responses": {"200": _json("Stats", "Statistics"), "401": _ERR}}},
            "/api/v1/complaints": {"get": {
                "summary": "Complaint rate per sender domain (last day, last week), newest "
                           "complaints",
                "description": (
                    "Complaints from feedback-loop reports (complaints.addresses) per delivered "
                    "recipient, per sender domain; `over` when a window's rate is above "
                    "complaints.rate_threshold_percent (0.3, the line Gmail and Yahoo draw)."),
                "responses": {"200": _json("Complaints", "Rates and recent complaints"),
                              "401": _ERR}}},
            "/api/v1/queue": {"get": {
                "summary": "Queued messages (oldest first)",
                "parameters": [
                    {"name": "domain", "in": "query", "schema": {"type": "string"}},
                    {"name": "state", "in": "query", "schema": {"type": "string", "enum": [
                        "ready", "sending", "held", "waiting for retry", "paused"]}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer"}},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "maximum": 1000, "default": 100}}],
                "responses": {"200": _json("QueueList", "Messages"), "401": _ERR}}},
            "/api/v1/queue/domains": {"get": {
                "summary": "The queue by destination domain",
                "responses": {"200": {"description": "Domains"}, "401": _ERR}}},
            "/api/v1/queue/domains/{domain}/{action}": {"post": {
                "summary": "Delete, hold, release or retry now every message for a domain",
                "parameters": [{"name": "domain", "in": "path", "required": True,
                                "schema": {"type": "string"}}, _ACTION],
                "responses": {"200": _json("ActionResult", "Done"), "401": _ERR,
                              "409": _ERR}}},
            "/api/v1/queue/{id}": {
                "get": {"summary": "One message: state, recipients, .inf and history",
                        "parameters": [_ID],
                        "responses": {"200": _json("QueuedMessage", "The message"),
                                      "404": _ERR}},
                "delete": {"summary": "Delete a message", "parameters": [_ID],
                           "responses": {"200": _json("ActionResult", "Deleted"),
                                         "404": _ERR, "409": _ERR}}},
            "/api/v1/queue/{id}/{action}": {"post": {
                "summary": "Delete, hold, release or retry now one message",
                "parameters": [_ID, _ACTION],
                "responses": {"200": _json("ActionResult", "Done"), "404": _ERR,
                              "409": _ERR}}},
            "/metrics": {"get": {
                "summary": "Prometheus metrics (text format; no token needed)",
                "security": [],
                "responses": {"200": {"description": "text/plain; version=0.0.4"}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"}}},
                "Inject": {
                    "type": "object", "required": ["from", "to"],
                    "additionalProperties": False,
                    "properties": {
                        "from": {"type": "string", "description": "Envelope sender; '' = <>"},
                        "to": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                        "headers": {"oneOf": [
                            {"type": "object", "additionalProperties": {"type": "string"}},
                            {"type": "array", "items": {"type": "array", "minItems": 2,
                                                        "maxItems": 2,
                                                        "items": {"type": "string"}}}]},
                        "body": {"type": "string"},
                        "raw": {"type": "string", "description": "RFC 5322 message"},
                        "raw_base64": {"type": "string", "contentEncoding": "base64"},
                        "substitutions": {"type": "object", "additionalProperties": {
                            "type": "object", "additionalProperties": {"type": "string"}}},
                        "defaults": {"type": "object",
                                     "additionalProperties": {"type": "string"}},
                        "pool": {"type": "string", "description": "the sending pool "
                                 "(shaping.toml [pools.NAME]); as an X-MailEngine-Pool field"}}},
                "Injected": {"type": "object", "properties": {
                    "ids": {"type": "array", "items": {"type": "string"}},
                    "messages": {"type": "array", "items": {"type": "object", "properties": {
                        "id": {"type": "string"},
                        "to": {"type": "array", "items": {"type": "string"}},
                        "local": {"type": "array", "items": {"type": "string"}},
                        "size": {"type": "integer"}}}},
                    "suppressed": {
                        "type": "array", "description": (
                            "recipients left out: on the suppression list for this sender "
                            "(the answer is 200, not 202, when that was every recipient)"),
                        "items": {"type": "object", "properties": {
                            "address": {"type": "string"}, "reason": {"type": "string"},
                            "source": {"type": "string"},
                            "sender_domain": {"type": "string"}}}}}},
                "Stats": {"type": "object", "properties": {
                    "received": {"type": "integer"}, "sent": {"type": "integer"},
                    "failed": {"type": ["integer", "null"]},
                    "queue_messages": {"type": "integer"},
                    "inbound_connections": {"type": "integer"},
                    "outbound_connections": {"type": "integer"},
                    "delivery_processes": {"type": "integer", "description": (
                        "processes running the outbound sessions (0: the engine itself)")},
                    "memory_bytes": {"type": "integer"},
                    "destinations": {"type": "array", "items": {"type": "object"}},
                    "shaping": {"type": "array", "items": {"type": "object", "properties": {
                        "dest": {"type": "string"}, "action": {"type": "string"},
                        "cause": {"type": "string"}, "until": {"type": "number"},
                        "factor": {"type": "number"}}}},
                    "sources": {"type": "array", "items": {"type": "object", "properties": {
                        "source": {"type": "string"}, "ip": {"type": "string"},
                        "helo": {"type": "string"}, "warmup_day": {"type": ["integer", "null"]},
                        "warmed": {"type": "boolean"},
                        "limit": {"type": ["integer", "null"]},
                        "today": {"type": "object", "description": "provider -> "
                                  "{used, limit}: recipients sent from it today"}}}}}},
                "Complaints": {"type": "object", "properties": {
                    "threshold_percent": {"type": "number"},
                    "windows": {"type": "array", "items": {"type": "string"}},
                    "addresses": {"type": "array", "items": {"type": "string"}},
                    "domains": {"type": "array", "items": {"type": "object", "properties": {
                        "domain": {"type": "string"}, "over": {"type": "boolean"},
                        "1d": {"$ref": "#/components/schemas/ComplaintWindow"},
                        "7d": {"$ref": "#/components/schemas/ComplaintWindow"}}}},
                    "recent": {"type": "array", "items": {"type": "object"}, "description": (
                        "the newest lines of log/complaints.jsonl, newest first")}}},
                "ComplaintWindow": {"type": "object", "properties": {
                    "delivered": {"type": "integer"}, "complaints": {"type": "integer"},
                    "rate_percent": {"type": ["number", "null"]}}},
                "QueuedMessage": {"type": "object", "properties": {
                    "id": {"type": "string"}, "from": {"type": "string"},
                    "to": {"type": "array", "items": {"type": "string"}},
                    "state": {"type": "string"}, "held": {"type": "boolean"},
                    "tries": {"type": "integer"},
                    "retry_time": {"type": ["string", "null"]},
                    "last_replies": {
                        "type": "object", "description": "recipient -> the last reply that "
                        "deferred it (one per destination domain; kept in the .inf)",
                        "additionalProperties": {"type": "object", "properties": {
                            "time": {"type": "string"}, "reply": {"type": "string"},
                            "category": {"type": "string", "description": "the reply's bounce "
                                         "category (bad-mailbox, quota-issues, ...)"}}}},
                    "history": {"type": "array", "items": {"type": "string"}},
                    "inf": {"type": "string"}}},
                "QueueList": {"type": "object", "properties": {
                    "total": {"type": "integer"}, "offset": {"type": "integer"},
                    "partial": {"type": "boolean", "description": (
                        "true when more messages wait on disk only than are read to list "
                        "them: filters and pages then cover part of the queue")},
                    "messages": {"type": "array",
                                 "items": {"$ref": "#/components/schemas/QueuedMessage"}}}},
                "ActionResult": {"type": "object", "properties": {
                    "action": {"type": "string"},
                    "done": {"type": "array", "items": {"type": "string"}},
                    "not_done": {"type": "object",
                                 "additionalProperties": {"type": "string"}}}},
            }},
    }
    doc["paths"].update(_SUPPRESSION_PATHS)
    doc["components"]["schemas"].update(_SUPPRESSION_SCHEMAS)
    return doc


# --- the suppression list (web/suppressions.py) ---

_ADDRESS = {"name": "address", "in": "path", "required": True, "schema": {"type": "string"}}
_SENDER_DOMAIN = {"name": "sender_domain", "in": "query", "schema": {"type": "string"},
                  "description": "the entry for this sender domain; absent or '' = the entry "
                                 "for every sender"}
_SUPPRESSION_PATHS = {
    "/api/v1/suppressions": {
        "get": {"summary": "Suppression list entries, by address",
                "parameters": [
                    {"name": "search", "in": "query", "schema": {"type": "string"},
                     "description": "part of the address"},
                    {"name": "sender_domain", "in": "query", "schema": {"type": "string"},
                     "description": "only this sender domain's entries ('' = those for every "
                                    "sender); absent: all"},
                    {"name": "source", "in": "query", "schema": {
                        "type": "string", "enum": ["manual", "bounce", "complaint",
                                                   "unsubscribe", "import"]}},
                    {"name": "expired", "in": "query", "schema": {"type": "boolean"},
                     "description": "expired entries too"},
                    {"name": "offset", "in": "query", "schema": {"type": "integer"}},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "maximum": 1000, "default": 100}}],
                "responses": {"200": _json("SuppressionList", "Entries"), "400": _ERR,
                              "401": _ERR}},
        "post": {"summary": "Suppress one address, or several (all or none)",
                 "description": "An entry for the same address and sender domain is replaced. "
                                "Each added entry writes a 'suppressed' line to "
                                "log/events.jsonl.",
                 "requestBody": {"required": True, "content": {"application/json": {
                     "schema": {"oneOf": [
                         {"$ref": "#/components/schemas/SuppressionNew"},
                         {"type": "object", "required": ["entries"], "properties": {
                             "entries": {"type": "array", "items": {
                                 "$ref": "#/components/schemas/SuppressionNew"}}}}]}}}},
                 "responses": {"201": _json("SuppressionAdded", "Added"), "400": _ERR,
                               "401": _ERR}}},
    "/api/v1/suppressions/export": {"get": {
        "summary": "Every entry as CSV (address,sender_domain,reason,source,created,expires; "
                   "times ISO 8601 UTC)",
        "responses": {"200": {"description": "text/csv"}, "401": _ERR}}},
    "/api/v1/suppressions/import": {"post": {
        "summary": "Add the entries of a CSV file (a header naming the columns, or an address "
                   "per line); nothing is added when a line is bad",
        "requestBody": {"required": True, "content": {"text/csv": {
            "schema": {"type": "string"}}}},
        "responses": {"200": {"description": "{\"imported\": N}"}, "400": _ERR, "401": _ERR,
                      "413": _ERR}}},
    "/api/v1/suppressions/{address}": {
        "get": {"summary": "The entries of one address, and whether it is suppressed now",
                "parameters": [_ADDRESS, _SENDER_DOMAIN],
                "responses": {"200": {"description": "{address, entries, suppressed, active}"},
                              "404": _ERR, "401": _ERR}},
        "delete": {"summary": "Take an address off the list",
                   "parameters": [_ADDRESS, _SENDER_DOMAIN],
                   "responses": {"200": {"description": "Removed"}, "400": _ERR,
                                 "404": _ERR, "401": _ERR}}},
}
_SUPPRESSION_SCHEMAS = {
    "Suppression": {"type": "object", "properties": {
        "address": {"type": "string"},
        "sender_domain": {"type": "string", "description": "'' = every sender"},
        "reason": {"type": "string"},
        "source": {"type": "string",
                   "enum": ["manual", "bounce", "complaint", "unsubscribe", "import"]},
        "created": {"type": "number", "description": "epoch seconds"},
        "expires": {"type": ["number", "null"], "description": "epoch seconds; null = never"}}},
    "SuppressionNew": {"type": "object", "required": ["address"], "additionalProperties": False,
                       "properties": {
                           "address": {"type": "string"}, "reason": {"type": "string"},
                           "source": {"type": "string", "default": "manual"},
                           "sender_domain": {"type": "string", "default": ""},
                           "expires": {"type": ["number", "string", "null"],
                                       "description": "epoch seconds or ISO 8601; null = never"}}},
    "SuppressionList": {"type": "object", "properties": {
        "total": {"type": "integer"}, "offset": {"type": "integer"},
        "entries": {"type": "array", "items": {"$ref": "#/components/schemas/Suppression"}}}},
    "SuppressionAdded": {"type": "object", "properties": {
        "entries": {"type": "array", "items": {"$ref": "#/components/schemas/Suppression"}}}},
}


if __name__ == "__main__":  # python -m mailengine.web.openapi > docs/openapi.json
    import json
    print(json.dumps(openapi(), indent=2, ensure_ascii=False))
