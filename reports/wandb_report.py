"""A W&B Report of one sweep (wandb-workspaces): the runs of the sweep's group, scatter plots of each
metric against sparsity (log y for perplexity), the per-layer sparsity lines, and the results tables
the cells logged (`logger=wandb`), plus the markdown tables and the targets' verdicts as text.

Offline (the default) it writes the report's spec, the JSON W&B stores for a report, to
`<sweep dir>/wandb_report.json`, so it can be reviewed, diffed and saved later: given that file instead of
a sweep dir, `--online` saves the spec as it is (from a machine that can reach W&B, after `wandb sync` of
the offline runs), its runsets pointed at the project. `--online` on a sweep dir saves the report built
there. Either needs `wandb login` and prints the report's URL. The panel ids wandb-workspaces draws at
random are seeded from the sweep's name, so the same sweep gives the same spec. Offline, the report to read
is `report.html` (`collect --format html`): the spec is what W&B will show, not something to open.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

from reports.collect import collect

SPEC_FILE = "wandb_report.json"


def report_object(sweep_dir: Path, project: str, entity: str, online: bool):
    import wandb_workspaces.reports.v2 as wr  # seconds to import: only this command pays it

    sweep_dir = Path(sweep_dir)
    report = collect(sweep_dir, write=False)
    group = sweep_dir.name
    metrics = sorted({name for r in report.records for name in r.metric_values()})
    panels = [wr.ScatterPlot(title=f"{m} vs sparsity", x=wr.Config("sparsity"), y=wr.SummaryMetric(m),
                             log_y=m.startswith("ppl")) for m in metrics]
    panels.append(wr.LinePlot(title="per-layer sparsity", x="layer", y=["layer_sparsity"]))
    panels += [wr.WeavePanelSummaryTable(table_name=name) for name in ("metrics", "per_layer_sparsity")]
    # Offline a runset cannot name its project: wandb-workspaces looks the project's id up on the server
    runset = wr.Runset(entity=entity if online else "", project=project if online else "", name=group,
                       filters=f"Group = '{group}'")
    blocks = [wr.H1(f"prunebench sweep {group}"),
              wr.P(f"{len(report.records)} cells; runs logged with logger=wandb, group {group}."),
              wr.PanelGrid(runsets=[runset], panels=panels)]
    for table in report.tables:
        blocks += [wr.H2(table.title), wr.MarkdownBlock(text=table.markdown)]
    return wr.Report(project=project, entity=entity, title=f"prunebench: {group}",
                     description="Tables and plots of a prunebench sweep", blocks=blocks)


def build_report(sweep_dir: Path, project: str = "prunebench", entity: Optional[str] = None,
                 online: bool = False) -> str:
    """Offline: write the spec JSON and return its path; online: save the report and return its URL."""
    sweep_dir = Path(sweep_dir)
    if online:
        import wandb

        report = report_object(sweep_dir, project, entity or wandb.Api().default_entity, online=True)
        return report.save().url
    state = random.getstate()
    random.seed(sweep_dir.name)
    try:
        spec = report_object(sweep_dir, project, entity or "offline", online=False)._to_model()
    finally:
        random.setstate(state)
    path = sweep_dir / SPEC_FILE
    path.write_text(json.dumps(spec.model_dump(by_alias=True, exclude_none=True, mode="json"), indent=1) + "\n")
    return str(path)


def upload_spec(spec_path: Path, project: str = "prunebench", entity: Optional[str] = None) -> str:
    """Save a spec written offline to W&B under `project` (offline, its runsets could name no project) and
    return the report's URL."""
    import wandb
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces.reports.v2 import internal

    try:
        report = wr.Report._from_model(internal.ReportViewspec.model_validate(json.loads(Path(spec_path).read_text())))
    except ValueError as exc:  # JSON and pydantic's validation errors alike
        raise ValueError(f"{spec_path}: not a W&B report spec ({str(exc).splitlines()[0]})") from None
    report.project, report.entity = project, entity or wandb.Api().default_entity
    for block in report.blocks:
        if isinstance(block, wr.PanelGrid):
            for runset in block.runsets:
                runset.entity, runset.project = report.entity, report.project
    return report.save().url
