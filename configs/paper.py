r"""Every ImageNet experiment of Tables 1-5, 10 and 11 of the paper, one config argument each.

    python -m l2s_jax.main --config configs/paper.py:table=1,student=convnext_t,teacher=slak_t \
        --config.teacher.checkpoint=ckpt/slak_tiny --config.data.data_dir=$TFDS_DATA_DIR --workdir runs/t1_slak_cnx

Arguments:
  table    1 (NKD, 120 epochs), 2 (KD, 120), 3 (FD or FD+NKD into ResNet-50, 120, L=1),
           4 (FD into ResNet-50 with L = 1..4 stages, 120), 5 (NKD into ResNet-50, 300 epochs),
           10 (NKD into ResNet-50, timm recipe, 120), 11 (NKD into MobileNetV3, timm recipe, 120)
  student  convnext_t | resnet50 | mobilenetv3   (default: the table's only student if it has one)
  teacher  vit_s | swin_t | cswin_t | resnet50 | convnext_t | slak_t | none (the CE baseline)
  method   table 3 only: fd | fd+nkd
  L        table 4 only: 1..4 feature stages
  T        temperature of KD / NKD (the paper sweeps 1, 2, 5, 10, 20)

The teacher comes from a converted checkpoint (default ``checkpoints/<model>``; convert with
``python tools/convert_weights.py --arch <family> --src FILE --out DIR``). The printed gains
table compares with the paper's numbers (``config.paper``). Point ``config.baseline.workdir`` at
the workdir of the ``teacher=none`` run of the same table to get measured Direct/Effective Gains.
"""
from l2s_jax import config_lib

_RESNET_T1 = {"vit_s": 77.14, "swin_t": 77.67, "cswin_t": 77.68, "resnet50": 77.82, "convnext_t": 78.04,
              "slak_t": 78.57}
_CONVNEXT_T1 = {"swin_t": 81.10, "cswin_t": 81.65, "resnet50": 81.15, "convnext_t": 81.77, "slak_t": 82.17}
_RESNET_T2 = {"vit_s": 76.96, "swin_t": 76.87, "cswin_t": 76.77, "convnext_t": 76.93, "slak_t": 77.05}
_CONVNEXT_T2 = {"swin_t": 80.93, "cswin_t": 81.18, "convnext_t": 81.64, "slak_t": 81.86}

# table -> settings and, per (student, method, L), baseline top-1 and distilled top-1 per teacher.
TABLES = {
    1: dict(method="nkd", epochs=120, recipe="convnext", rows={
        ("resnet50", "nkd", 1): (76.13, _RESNET_T1), ("convnext_t", "nkd", 1): (81.00, _CONVNEXT_T1)}),
    2: dict(method="kd", epochs=120, recipe="convnext", rows={
        ("resnet50", "kd", 1): (76.13, _RESNET_T2), ("convnext_t", "kd", 1): (81.00, _CONVNEXT_T2)}),
    3: dict(method="fd", epochs=120, recipe="convnext", rows={
        ("resnet50", "fd", 1): (76.13, {"vit_s": 76.81, "swin_t": 76.77, "convnext_t": 76.73, "slak_t": 76.85}),
        ("resnet50", "fd+nkd", 1): (76.13, {"vit_s": 76.84, "swin_t": 77.33, "convnext_t": 77.85, "slak_t": 77.99})}),
    4: dict(method="fd", epochs=120, recipe="convnext", rows={
        ("resnet50", "fd", 1): (76.13, {"swin_t": 76.77, "slak_t": 76.85}),
        ("resnet50", "fd", 2): (76.13, {"swin_t": 76.76, "slak_t": 76.79}),
        ("resnet50", "fd", 3): (76.13, {"swin_t": 76.81, "slak_t": 76.94}),
        ("resnet50", "fd", 4): (76.13, {"swin_t": 76.73, "slak_t": 76.92})}),
    5: dict(method="nkd", epochs=300, recipe="convnext", rows={
        ("resnet50", "nkd", 1): (78.76, {"vit_s": 78.88, "swin_t": 79.44, "convnext_t": 80.09, "slak_t": 80.24})}),
    10: dict(method="nkd", epochs=120, recipe="timm", rows={
        ("resnet50", "nkd", 1): (78.06, {"vit_s": 78.50, "swin_t": 78.76, "cswin_t": 78.80, "convnext_t": 78.95,
                                         "slak_t": 79.14})}),
    11: dict(method="nkd", epochs=120, recipe="timm", rows={
        ("mobilenetv3", "nkd", 1): (73.59, {"vit_s": 74.42, "swin_t": 74.53, "cswin_t": 74.51, "convnext_t": 74.67,
                                            "slak_t": 75.01})}),
}


def experiments() -> list[str]:
    """Every config argument this file accepts: one per table row, plus each table's baseline."""
    out = []
    for table, spec in TABLES.items():
        for (student, method, stages), (_, distilled) in spec["rows"].items():
            extra = (f",method={method}" if table == 3 else "") + (f",L={stages}" if table == 4 else "")
            out += [f"table={table},student={student},teacher={t}{extra}" for t in distilled]
            if stages == 1 and method == spec["method"]:
                out.append(f"table={table},student={student},teacher=none")
    return out


def get_config(arg: str | None = None):
    """The experiment named by ``arg`` (see the module docstring)."""
    args = config_lib.parse_arg(arg, table=1, student="", teacher="slak_t", method="", L=1, T=1.0)
    if args.table not in TABLES:
        raise ValueError(f"table={args.table}: this file covers tables {sorted(TABLES)}")
    spec = TABLES[args.table]
    students = sorted({s for s, _, _ in spec["rows"]})
    student = args.student or (students[0] if len(students) == 1 else "")
    method = args.method or spec["method"]
    if args.table != 3 and args.method:
        raise ValueError("method= is an argument of table 3 only")
    if args.table != 4 and args.L != 1:
        raise ValueError("L= is an argument of table 4 only")
    key = (student, method, args.L)
    if key not in spec["rows"]:
        raise ValueError(f"table {args.table} has no rows for student={student!r} method={method!r} L={args.L}; "
                         f"it has {sorted(spec['rows'])}")
    baseline, distilled = spec["rows"][key]
    if args.teacher != "none" and args.teacher not in distilled:
        raise ValueError(f"table {args.table} has no {args.teacher!r} teacher for {student}; "
                         f"it has {sorted(distilled)} (or teacher=none for the baseline)")
    c = config_lib.experiment(teacher=args.teacher, student=student, method="ce" if args.teacher == "none" else method,
                              epochs=spec["epochs"], recipe=spec["recipe"], fd_stages=args.L, temperature=args.T)
    c.paper.student_top1 = baseline
    if args.teacher != "none":
        c.paper.teacher_top1 = config_lib.TEACHERS[args.teacher]["top1"]
        c.paper.distilled_top1 = distilled[args.teacher]
    return c
