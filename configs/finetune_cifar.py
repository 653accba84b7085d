"""Transfer to CIFAR-10/100 (Appendix E, Table 12): fine-tune a converted checkpoint or a student.

    python -m l2s_jax.main --config configs/finetune_cifar.py:dataset=cifar100,init=runs/l2s_t \\
        --config.data.data_dir=$TFDS_DATA_DIR --workdir runs/cifar100_l2s_t

``init`` is a converted checkpoint (spec.json) or a training workdir (its final student): every
weight but the classifier is loaded (a parameter that does not fit is an error listing them), the
classifier starts fresh for 10 / 100 classes. The paper's recipe: SGD, lr 1e-3, momentum 0.9,
50 epochs. Images are upsampled from 32 to ``size`` (default 224, the resolution the ImageNet
weights were trained at; bicubic, as the eval transform) with RandomResizedCrop(0.35-1) + flip and
no RandAugment / Mixup / erasing: the weights already carry ImageNet's augmentation, and CIFAR's
32x32 images lose too much under scale 0.08 crops.
"""
from l2s_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, dataset="cifar100", init="", model="convnext_tiny_bn", size=224, epochs=50.0,
                                batch_size=128)
    if args.dataset not in ("cifar10", "cifar100"):
        raise ValueError(f"dataset={args.dataset}: expected cifar10 or cifar100")
    if not args.init:
        raise ValueError("init=DIR is required: a converted checkpoint or a training workdir to fine-tune")
    c = config_lib.base_config()
    c.init = args.init
    c.model.name = args.model
    c.model.label = f"{args.model} <- {args.init}"
    c.distill.method = "ce"
    c.teacher.update(name="", checkpoint="")
    c.data.update(name=args.dataset, train_split="train", eval_split="test", image_size=args.size, eval_crop_pct=1.0)
    c.aug.update(rrc_scale=(0.35, 1.0), hflip=0.5, auto_augment="", reprob=0.0)
    c.mixup.update(prob=0.0)
    c.label_smoothing = 0.0
    c.optim.update(name="sgd", lr=1e-3, lr_base_batch_size=args.batch_size, momentum=0.9, weight_decay=0.0,
                   warmup_epochs=0.0, min_lr=0.0)
    c.ema_decay = 0.0
    c.batch_size = args.batch_size
    c.eval_batch_size = args.batch_size
    c.epochs = float(args.epochs)
    c.eval_every_epochs = 5.0
    return c
