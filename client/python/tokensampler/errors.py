"""TokenSamplerError: what every failed call raises."""


class TokenSamplerError(Exception):
    """A failed call. `code` is the grpc.StatusCode, `details` the server's message, e.g.
    INVALID_ARGUMENT, "rows[0].params.top_p must be in (0, 1], got 1.5"."""

    def __init__(self, code, details):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
