"""One fix inside Jina's worker, at the depth where the problem is.

Jina (3.33/3.34) turns an exception raised by a batch endpoint into an error status inside the response,
which the gateway forwards and the client raises. An exception raised by a *streaming* endpoint instead
ends the gRPC call with an error; the gateway takes that as a broken connection and replays the whole
stream against the worker (the client sees the tokens several times, then a quiet end). This patch makes
the worker's ``stream_doc`` answer a failed stream the way batch endpoints answer: one response carrying
the error status, after whatever was already sent. No retry happens and the Jina client raises
``BadServer`` with the message. Installed when ``executor`` is imported, i.e. in the worker process before
its gRPC server registers the handler.
"""

import logging

from jina.serve.runtimes.worker.request_handling import WorkerRequestHandler
from jina.types.request.data import SingleDocumentRequest

log = logging.getLogger("jina_llm_stream.jina_compat")


def install() -> None:
    original = WorkerRequestHandler.stream_doc
    if getattr(original, "_reports_errors_in_band", False):
        return

    async def stream_doc(self, request, context):
        try:
            async for response in original(self, request, context):
                yield response
        except Exception as error:  # noqa: BLE001 - every failure must reach the client as an error
            response = SingleDocumentRequest()
            response.header.request_id = request.header.request_id
            response.header.exec_endpoint = request.header.exec_endpoint
            response.add_exception(error, getattr(self, "_executor", None))
            yield response

    stream_doc._reports_errors_in_band = True
    WorkerRequestHandler.stream_doc = stream_doc
