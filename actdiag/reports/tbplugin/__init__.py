"""actdiag's own TensorBoard dashboard: a dynamic plugin (entry point group `tensorboard_plugins`) whose frontend is
one hand-written ES module, `static/index.js`, loaded by TensorBoard into an iframe (no build step at install).

It reads what the TensorBoard sink wrote (`actdiag.reports.tensorboard`): the `actdiag/profile` and `actdiag/report`
JSON summaries under the plugin name `actdiag`, and the `activations/<layer>` / `gradients/<layer>` histograms.
It is active for a logdir that holds actdiag summaries and inactive (no error) otherwise.

    /index.js                              the frontend
    /runs                                  [{run, steps, report}] for every run with actdiag data
    /profile?run=R                         {steps, profiles}: the depth profile of each recorded step
    /report?run=R                          the findings (null until the watch closed)
    /histograms?run=R&kind=K&step=S        per layer, in depth order, the K histogram nearest step S

This module imports neither torch nor the rest of actdiag at load time: TensorBoard loads every plugin at start-up.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from actdiag.reports.tensorboard import BLOB_SCHEMA, PLUGIN_NAME, PROFILE_TAG, REPORT_TAG

# TensorBoard keeps a random sample of 10 points per tag for a plugin it does not know; the depth profile's step
# slider and the unit-health heatmaps want the run's history, so the loader raises that (as for histograms) unless
# the user set `--samples_per_plugin actdiag=N` themselves. A profile is one short JSON string per recorded step.
SAMPLES_KEPT = 500
HISTOGRAM_KINDS = ("activations", "gradients")
HISTOGRAMS_PLUGIN = "histograms"
# The data providers want a downsampling bound; what they hold is already bounded by the sampling above.
_READ_ALL = 100_000


def _json(request: Any, obj: Any) -> Any:
    return http_util.Respond(request, json.dumps(obj, allow_nan=False), "application/json")


def _blob(datum: Any) -> Any:
    """The JSON object stored in one actdiag summary."""
    raw = datum.numpy.item()
    return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)


def _arg(request: Any, name: str) -> str:
    value = request.args.get(name)
    if value is None:
        raise errors.InvalidArgumentError(f"missing query parameter {name!r}")
    return str(value)


class ActdiagPlugin(base_plugin.TBPlugin):
    """The backend: routes that turn actdiag's summaries into JSON for `static/index.js`."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._data = context.data_provider

    # ------------------------------------------------------------------ TBPlugin
    def get_plugin_apps(self) -> dict[str, Any]:
        routes = {
            "/index.js": self._serve_js,
            "/runs": self._serve_runs,
            "/profile": self._serve_profile,
            "/report": self._serve_report,
            "/histograms": self._serve_histograms,
        }
        return {path: wrappers.Request.application(handler) for path, handler in routes.items()}

    def is_active(self) -> bool:
        # TensorBoard asks the data provider which plugins have data first (`data_plugin_names`); this is only
        # reached for a logdir without actdiag summaries, or with no data provider at all.
        if self._data is None:
            return False
        try:
            return PLUGIN_NAME in self._data.list_plugins(plugin_util.context({}), experiment_id="")
        except Exception:  # noqa: BLE001 - an unreadable logdir makes the tab inactive, never an error
            return False

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="actdiag", disable_reload=False)

    # ------------------------------------------------------------------ reading
    def _read(self, request: Any, plugin: str, run: str, tags: list[str] | None) -> dict[str, list[Any]]:
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        got = self._data.read_tensors(
            ctx,
            experiment_id=eid,
            plugin_name=plugin,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=tags),
            downsample=_READ_ALL,
        )
        return dict(got.get(run, {}))

    def _profiles(self, request: Any, run: str) -> list[tuple[int, Any]]:
        """(step, profile) in step order; a step written twice (a resumed run) keeps its latest profile."""
        data = self._read(request, PLUGIN_NAME, run, [PROFILE_TAG]).get(PROFILE_TAG, [])
        by_step: dict[int, tuple[float, Any]] = {}
        for d in data:
            if d.step not in by_step or d.wall_time >= by_step[d.step][0]:
                by_step[d.step] = (d.wall_time, d)
        out = []
        for step in sorted(by_step):
            blob = _blob(by_step[step][1])
            if blob.get("schema") == BLOB_SCHEMA:
                out.append((step, blob))
        return out

    # ------------------------------------------------------------------ routes
    def _serve_js(self, request: wrappers.Request) -> wrappers.Response:
        js = resources.files(__package__).joinpath("static", "index.js").read_text(encoding="utf-8")
        return http_util.Respond(request, js, "text/javascript")

    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        listing = self._data.list_tensors(ctx, experiment_id=eid, plugin_name=PLUGIN_NAME)
        runs = []
        for run in sorted(listing):
            tags = listing[run]
            profile = tags.get(PROFILE_TAG)
            runs.append(
                {
                    "run": run,
                    "steps": 0 if profile is None else profile.max_step,
                    "report": REPORT_TAG in tags,
                }
            )
        return _json(request, runs)

    def _serve_profile(self, request: wrappers.Request) -> wrappers.Response:
        profiles = self._profiles(request, _arg(request, "run"))
        return _json(request, {"steps": [s for s, _ in profiles], "profiles": [p for _, p in profiles]})

    def _serve_report(self, request: wrappers.Request) -> wrappers.Response:
        data = self._read(request, PLUGIN_NAME, _arg(request, "run"), [REPORT_TAG]).get(REPORT_TAG, [])
        latest = max(data, key=lambda d: (d.wall_time, d.step), default=None)
        blob = None if latest is None else _blob(latest)
        if blob is not None and blob.get("schema") != BLOB_SCHEMA:
            raise errors.InvalidArgumentError(
                f"this run's actdiag data has schema {blob.get('schema')!r}; this actdiag reads {BLOB_SCHEMA!r}"
            )
        return _json(request, blob)

    def _serve_histograms(self, request: wrappers.Request) -> wrappers.Response:
        run, kind = _arg(request, "run"), _arg(request, "kind")
        if kind not in HISTOGRAM_KINDS:
            raise errors.InvalidArgumentError(f"kind must be one of {', '.join(HISTOGRAM_KINDS)}, not {kind!r}")
        try:
            want = int(_arg(request, "step"))
        except ValueError:
            raise errors.InvalidArgumentError("step must be an integer") from None
        profiles = self._profiles(request, run)
        if not profiles:
            raise errors.NotFoundError(f"no actdiag data for run {run!r}")
        # Depth order from the profile of the requested step (or the nearest one recorded).
        _, profile = min(profiles, key=lambda sp: (abs(sp[0] - want), -sp[0]))
        names = [row["layer"] for row in profile["layers"]]
        series = self._read(request, HISTOGRAMS_PLUGIN, run, [f"{kind}/{n}" for n in names])
        layers = []
        for name in names:
            data = series.get(f"{kind}/{name}", [])
            if not data:
                continue
            # The histogram plugin keeps its own sample of steps: take the nearest, the later one on a tie.
            d = min(data, key=lambda x: (abs(x.step - want), -x.step))
            buckets = [[float(a), float(b), float(c)] for a, b, c in d.numpy.tolist()]
            layers.append({"layer": name, "step": d.step, "buckets": buckets})
        return _json(request, {"kind": kind, "step": want, "layers": layers})


class ActdiagLoader(base_plugin.TBLoader):
    """Loads the plugin; keeps more than TensorBoard's default 10 samples of actdiag's per-step summaries."""

    def fix_flags(self, flags: Any) -> None:
        samples = getattr(flags, "samples_per_plugin", None)
        if isinstance(samples, dict):
            samples.setdefault(PLUGIN_NAME, SAMPLES_KEPT)

    def load(self, context: base_plugin.TBContext) -> ActdiagPlugin:
        return ActdiagPlugin(context)
