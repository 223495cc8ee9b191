"""From a request to accepted events, in the order a body meets them:

- `admission.py`: the memory a request's body may take, and the wait for it (503 past it);
- `lane.py`: the ingest routes' short way through the app;
- `body.py`: the body read within its limits (size, decompression, time);
- `parse.py`: its JSON;
- `fast_validate.py` and `validate.py`: the contract checked (msgspec structs for valid bodies,
  pydantic's per-field answers otherwise) and the validator and transform hooks run;
- `fill_in.py`: what the server fills in (ids, the time of arrival);
- `worker.py`: big bodies validated in a worker process; `inprocess.py`: events a host app
  records in its own process (the middleware), validated without a body.

What comes out goes to the writer (`delivery/`)."""
