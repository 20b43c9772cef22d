"""The Analysis service's SAE, activation-record and explanation RPCs (mixed into AnalysisServicer):
one method per RPC, translating protos <-> tdb_server.sae / records / explain calls."""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import grpc
import torch

from tdb.v1 import analysis_pb2 as pb

from . import bounds, explain, wire
from .engine.scheduler import scheduler_for
from .errors import Cancelled, InvalidArgument
from .files import FileAccess
from .limits import Limits
from .records import Records, Window, activation_records
from .analyses.registry import REGISTRY, register
from .sae import AttachedSae, attach, attached, detach
from .servicer import _rpc, _rpc_stream


def sae_info(entry: AttachedSae) -> pb.SaeInfo:
    sae = entry.sae
    msg = pb.SaeInfo(site=sae.site, name=entry.name, path=sae.path, architecture=sae.cfg.architecture,
                     d_in=sae.cfg.d_in, d_sae=sae.d_sae, unit_prefix=f"{sae.site}.sae.latent.")
    if entry.quality is not None:
        msg.quality.CopyFrom(pb.SaeQuality(**entry.quality.to_dict()))
    return msg


def _window(w: Window) -> pb.ActivationWindow:
    return pb.ActivationWindow(window=w.window, token_ids=w.token_ids, tokens=w.tokens,
                               acts=wire.to_wire(torch.tensor(w.acts, dtype=torch.float32)), max_act=w.max_act,
                               max_pos=w.max_pos)


def records_proto(r: Records) -> pb.ActivationRecordsResult:
    return pb.ActivationRecordsResult(
        unit=r.unit, kind=r.kind, site=r.site, corpus=r.corpus, corpus_sha256=r.corpus_sha256, window=r.window,
        n_windows=r.n_windows, top=[_window(w) for w in r.top], random=[_window(w) for w in r.random],
        max_act=r.max_act, mean_max=r.mean_max, frac_windows_active=r.frac_windows_active, cached=r.cached)


def _record_args(request: Any, cache_bytes: int) -> dict[str, Any]:
    for name in ("n_top", "window"):
        if getattr(request, name) < 0:
            raise InvalidArgument(f"{name} must be >= 0 (0 = the default)", reason="OUT_OF_RANGE")
    kw: dict[str, Any] = {"n_top": request.n_top or 20, "window": request.window or 64, "cache_bytes": cache_bytes}
    if hasattr(request, "n_random"):
        if request.n_random < 0 or request.batch < 0:
            raise InvalidArgument("n_random and batch must be >= 0 (0 = the default)", reason="OUT_OF_RANGE")
        kw.update(n_random=request.n_random or 20, batch=request.batch or 32)
    return kw


def explanations(adapter: Any, node_names: list[str]) -> list[str]:
    """The latest explanation of each node ("" where there is none)."""
    return [explain.cached_text(adapter, n) if ".head." in n or ".neuron." in n or ".latent." in n else ""
            for n in node_names]


class SaeServicerMixin:
    adapter: Any
    files: FileAccess
    limits: Limits

    def _corpus(self, path: str) -> str | None:
        """A client's corpus file, if it may read it (None: the bundled held-out slice)."""
        return str(self.files.check(path, "corpus")) if path else None

    @_rpc
    def AttachSae(self, request: pb.AttachSaeRequest, context: grpc.ServicerContext) -> pb.SaeInfo:
        if not request.path:
            raise InvalidArgument("give the folder of an SAE (cfg.json + sae_weights.safetensors)", reason="BAD_SAE")
        folder = self.files.check(request.path, "SAE folder")
        with scheduler_for(self.adapter).turn():
            entry = attach(self.adapter, folder, name=request.name, evaluate=not request.skip_quality)
        return sae_info(entry)

    @_rpc
    def ListSaes(self, request: pb.ListSaesRequest, context: grpc.ServicerContext) -> pb.ListSaesResponse:
        return pb.ListSaesResponse(saes=[sae_info(e) for _, e in sorted(attached(self.adapter).items())])

    @_rpc
    def DetachSae(self, request: pb.DetachSaeRequest, context: grpc.ServicerContext) -> pb.DetachSaeResponse:
        detach(self.adapter, request.site)
        return pb.DetachSaeResponse()

    @_rpc_stream
    def ActivationRecords(self, request: pb.ActivationRecordsRequest,
                          context: grpc.ServicerContext) -> Iterator[pb.ActivationRecordsChunk]:
        """Progress chunks while the corpus pass runs (in a worker, holding the device), then the records."""
        kw = _record_args(request, self.limits.records_cache_bytes)
        corpus = self._corpus(request.corpus_path)
        left = threading.Event()
        context.add_callback(left.set)
        stop = bounds.stopper(context, self.limits.max_analysis_s, "the activation records' corpus pass")
        events: queue.Queue = queue.Queue()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                with scheduler_for(self.adapter).turn():
                    box["records"] = activation_records(
                        self.adapter, request.unit, corpus,
                        progress=lambda d, t, s: events.put(pb.RecordsProgress(stage=s, done=d, total=t)),
                        should_stop=stop, **kw)
            except BaseException as e:  # noqa: BLE001 - re-raised in the RPC thread
                box["error"] = e
            finally:
                events.put(None)

        threading.Thread(target=work, name="tdb-records", daemon=True).start()
        while (item := events.get()) is not None:
            yield pb.ActivationRecordsChunk(progress=item)
        if "error" in box:
            raise box["error"]
        if left.is_set():
            raise Cancelled("the client cancelled the request")
        yield pb.ActivationRecordsChunk(records=records_proto(box["records"]))

    @_rpc
    def Explain(self, request: pb.ExplainRequest, context: grpc.ServicerContext) -> pb.ExplainResponse:
        kw = _record_args(request, self.limits.records_cache_bytes)
        corpus = self._corpus(request.corpus_path)
        with scheduler_for(self.adapter).turn():
            exp, records = explain.explain(self.adapter, request.unit, corpus,
                                           use_llm=request.use_llm, **kw)
        msg = pb.ExplainResponse(
            unit=exp.unit, text=exp.text, method=exp.method, label=exp.label,
            top_tokens=[pb.TokenShare(text=t.text, share=t.share, lift=t.lift, count=t.count, token_id=t.token_id)
                        for t in exp.top_tokens],
            top_ngrams=[pb.TokenShare(text=t.text, share=t.share, lift=t.lift, count=t.count, token_id=-1)
                        for t in exp.top_ngrams],
            promoted=[pb.TokenLogit(text=t, logit=v) for t, v in exp.promoted],
            suppressed=[pb.TokenLogit(text=t, logit=v) for t, v in exp.suppressed],
            attention=exp.attention, corpus_attention=exp.corpus_attention, notes=exp.notes,
            llm_configured=explain.configured())
        if exp.score is not None:
            msg.score = exp.score
        if request.include_records:
            msg.records.CopyFrom(records_proto(records))
        return msg


def _register() -> None:
    """Advertise these analyses in Capabilities.analyses (the registry is data, see analyses/registry.py)."""
    for name, doc, fn in (
            ("sae_latents", "SAEs in the SAELens layout attached to a site and spliced with the reconstruction error "
                            "kept; latents are units for breakpoints, reads, patches, ablations and the node table; "
                            "quality: explained variance, L0, dead latents, loss recovered", attach),
            ("activation_records", "top-activating and random corpus windows of a neuron, head or SAE latent with "
                                   "per-token activations; batched, cached on disk", activation_records),
            ("explain", "local explanations (tokens and n-grams at the top activations, logit lens, head "
                        "attention patterns), optionally an OpenAI-compatible LLM", explain.explain)):
        if name not in REGISTRY:
            register(name, doc)(fn)


_register()
