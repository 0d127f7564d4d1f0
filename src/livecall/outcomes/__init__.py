"""What happened on a call, delivered where the business works, and made useful after it.

`webhook_payload` is the end-of-call webhook contract without I/O (payload, signature, retry
schedule, recording links); `outbox` keeps deliveries in the database; `webhooks` delivers
them (the worker, the signed recording route, the API and CLI helpers). `analysis` runs the
post-call analysis (summary, fields, success) and `memory` keeps what it learnt of a caller.
"""
