"""mitmproxy script for `make capture`: record a live provider's exchanges as a dump file for the
replay tests, with every secret taken out before anything is written.

    mitmdump -s tests/flows/capture.py --mode reverse:https://provider.example --set capture_file=tests/flows/x.mitm
"""

from __future__ import annotations

from mitmproxy import ctx, http, io

SECRET_REQUEST_HEADERS = ("authorization", "x-cashu", "cookie", "api-key", "x-api-key")
SECRET_RESPONSE_HEADERS = ("x-cashu", "set-cookie")


class Capture:
    def __init__(self) -> None:
        self._file = None
        self._writer: io.FlowWriter | None = None

    def load(self, loader) -> None:
        loader.add_option("capture_file", str, "", "Where to write the scrubbed flows.")

    def configure(self, updated: set[str]) -> None:
        if "capture_file" in updated and ctx.options.capture_file:
            self._file = open(ctx.options.capture_file, "ab")
            self._writer = io.FlowWriter(self._file)

    def response(self, flow: http.HTTPFlow) -> None:
        if self._writer is None:
            return
        scrubbed = flow.copy()
        for name in SECRET_REQUEST_HEADERS:
            if name in scrubbed.request.headers:
                scrubbed.request.headers[name] = "REDACTED"
        for name in SECRET_RESPONSE_HEADERS:
            if name in scrubbed.response.headers:
                scrubbed.response.headers[name] = "REDACTED"
        self._writer.add(scrubbed)
        self._file.flush()

    def done(self) -> None:
        if self._file:
            self._file.close()


addons = [Capture()]
