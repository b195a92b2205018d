"""Base configuration: every field, its legal values, and the DDPM defaults.

Experiment configs start from `get_config()` here and override a few fields:

    config = default.get_config()
    config.train.batch_size = 512

Any field can be overridden on the command line: `--config.optim.lr=1e-4`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # --- data -----------------------------------------------------------------------------------
    config.data = data = ml_collections.ConfigDict()
    data.name = "cifar10"          # "mnist_5k" (offline, embedded) | "folder" (data.path) | any
    #                                tfds image dataset name
    data.split = "train"           # tfds split string, or "train"/"test" for mnist_5k; a folder
    data.eval_split = "test"       # has one split (both are ignored for it)
    data.data_dir = ""             # tfds data_dir; "" = tfds default (~/tensorflow_datasets)
    data.path = ""                 # data.name="folder": a folder of PNG/JPEG/WebP/BMP images,
    #                                searched recursively (image_folder.py: layout, captions)
    data.folder_labels = "none"    # folder labels: "none" (all 0) | "subdirs" (DIR's immediate
    #                                sub-directories, sorted; the map is kept in the workdir)
    data.image_size = 32           # every image is resized (shorter side) and cropped to this
    data.num_channels = 3          # 1 | 3: grey/RGBA/palette images are converted (RGBA over
    #                                white); mnist_5k needs 28x28x1
    data.crop = "center"           # "center" | "random" (per seed, step and batch position)
    data.random_flip = True        # random horizontal flip (DDPM CIFAR-10); False for digits
    data.on_bad_image = "skip"     # unreadable/truncated file: "skip" (logged with its path,
    #                                counted in train/bad_images; the next readable example in
    #                                index order takes its place) | "stop" (names the file)
    data.captions = ""             # text models: "" = none | "digits" (mnist_5k, from the pixels)
    #                                | "dataset" (a folder's captions, or tfds data.caption_key)
    data.caption_key = ""          # tfds: the text feature read by data.captions="dataset"
    data.decode_threads = 0        # threads decoding each batch; 0 = one per CPU core
    data.cache_mb = 4096           # decoded images stay in memory when all of them fit in this
    #                                many MB per process (CIFAR-10: 150, CelebA 64: 2,000; 0 = off)
    data.prefetch = 2              # dispatches prepared ahead in a background thread (0 = none)

    # --- model: models.UNet ---------------------------------------------------------------------
    config.model = model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.num_groups = 32          # GroupNorm groups; must divide every level's channel count
    model.num_classes = 0          # 0 = unconditional; else labels 0..n-1 plus a null label n
    # Text to image: a frozen text encoder's output conditions the UNet (text/encoders.py).
    model.text_encoder = ""        # "" = no text | "minilm" (offline) | "clip" (converted weights)
    #                                | "precomputed" (embeddings from a file: text/precomputed.py)
    model.text_weights = ""        # "" = default files; clip: text.convert_clip's .npz;
    #                                precomputed: the embeddings .npz
    model.text_max_length = 24     # tokens per caption; longer ones are cut, with a warning
    model.text_conditioning = "cross_attention"  # "pooled" (added to the time embedding) |
    #                                "cross_attention" (to the token states) | "both"
    model.cross_attn_resolutions = ()  # heights with cross-attention after each block (and mid)
    model.num_heads = 4            # cross-attention heads; must divide those levels' channels
    model.dtype = "float32"        # compute dtype: "float32" | "bfloat16" (params stay float32)
    model.remat = False            # rematerialise res blocks to save memory

    # --- diffusion ------------------------------------------------------------------------------
    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "linear"    # "linear" | "cosine" | "sigmoid"
    diffusion.num_timesteps = 1000
    diffusion.prediction = "eps"     # "eps" | "x0" | "v"
    diffusion.var_type = "fixed_large"  # "fixed_large" | "fixed_small" | "learned_range"
    diffusion.loss_type = "simple"   # "simple" | "hybrid" | "vlb"
    diffusion.vlb_weight = 0.001     # λ of the hybrid loss (iDDPM)
    diffusion.weighting = "none"     # "none" | "min_snr"
    diffusion.min_snr_gamma = 5.0
    diffusion.t_sampling = "uniform"  # "uniform" | "stratified": one t per 1/B of [0, T) (VDM)
    diffusion.p_uncond = 0.0         # classifier-free guidance: label dropout to the null label

    # --- optimiser: Adam with linear warmup and global-norm clipping ----------------------------
    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 2e-4
    optim.warmup_steps = 5000
    optim.decay_steps = 0            # 0 = constant lr after warmup (DDPM); else cosine from lr at
    optim.end_lr = 0.0               # warmup_steps to end_lr at decay_steps, then end_lr
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.grad_clip = 1.0            # global-norm clipping; 0 = off

    # --- training loop --------------------------------------------------------------------------
    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 128           # global batch, split over all devices of all processes
    train.num_steps = 800_000
    train.ema_decay = 0.9999
    train.ema_warmup = False         # True: decay min(ema_decay, (1 + t) / (10 + t)) at update t
    train.steps_per_dispatch = 1     # updates per jitted call (lax.scan); divides every interval
    train.log_every = 100
    train.checkpoint_every = 5000
    train.keep_checkpoints = 3
    train.sample_every = 0           # 0 = never; else write a sample grid to TensorBoard
    train.sample_num_steps = 100     # steps of sample.sampler for the grids and FID estimates

    # --- sampling: --mode=sample, --mode=guidance_sweep -----------------------------------------
    config.sample = sample = ml_collections.ConfigDict()
    sample.num_samples = 64
    sample.batch_size = 64           # per call; a multiple of the device count
    sample.sampler = "ancestral"     # "ancestral" | "ddim" | "dpm_solver_pp_2m" |
                                     # "dpm_solver_pp_2m_sde" | "heun"
    sample.num_steps = 0             # 0 = all num_timesteps; else respaced to this many steps
    sample.spacing = "linspace"      # respaced t: "linspace" | "leading" | "trailing" (diffusers');
                                     # the DPM-Solver++ samplers keep their log-SNR spacing
    sample.eta = 0.0                 # DDIM η (0 = deterministic)
    sample.clip_x0 = True
    sample.guidance_scale = 0.0      # classifier-free guidance w (0 = plain conditional)
    sample.labels = ""               # "" = one grid row per class; else a class or "3,1,4" (cycled)
    sample.unconditional = False     # conditional models: sample with the null condition ∅
    sample.prompt = ""               # text models: the prompt of every sample
    sample.prompts = ""              # text models: a file, one prompt per line (a grid row each)
    sample.classifier_scale = 0.0    # classifier guidance s (0 = off); see --mode=train_classifier
    sample.classifier_workdir = ""   # "" = <workdir>/classifier
    sample.progress_every = 100      # steps per jitted chunk, with a progress line (0 = one chunk)
    sample.use_ema = True
    sample.seed = 0
    sample.sweep_scales = (0.0, 1.0, 3.0, 5.0)  # --mode=guidance_sweep: CFG scales w to compare
    sample.sweep_per_class = 100     # --mode=guidance_sweep: samples per class and scale

    # --- noise-aware classifier p_φ(y | x_t, t) for classifier guidance: --mode=train_classifier --
    # Trained on x_t = q_sample(x_0, t, ε) of config.data under config.diffusion's schedule, into
    # <workdir>/classifier. Sizes follow guided-diffusion's classifiers (AdamW 3e-4, wd 0.05).
    config.classifier = classifier = ml_collections.ConfigDict()
    classifier.num_classes = 10
    classifier.ch = 128
    classifier.ch_mult = (1, 2, 2, 2)
    classifier.num_res_blocks = 2
    classifier.attn_resolutions = (16,)
    classifier.dropout = 0.0
    classifier.num_groups = 32       # must divide every level's channel count
    classifier.lr = 3e-4
    classifier.weight_decay = 0.05
    classifier.batch_size = 128      # global batch, a multiple of the device count
    classifier.num_steps = 100_000
    classifier.ema_decay = 0.0       # 0 = guide with the raw parameters
    classifier.steps_per_dispatch = 1  # updates per jitted call; divides every interval below
    classifier.log_every = 100
    classifier.checkpoint_every = 5000

    # --- evaluation: --mode=eval, and optional estimates during training ------------------------
    # The bound is computed on data.eval_split; FID/KID/IS compare samples (config.sample's
    # sampler, steps and guidance) with eval.fid_ref_split. See evaluate.py.
    config.eval = ev = ml_collections.ConfigDict()
    ev.use_ema = True
    ev.seed = 0
    ev.batch_size = 128              # global batch of the bound and the feature network
    ev.bpd = True                    # --mode=eval computes the variational bound (bits/dim)
    ev.bpd_num_examples = 0          # 0 = the whole eval split; else its first N examples
    ev.bpd_t_chunk = 100             # timesteps per jitted call (a progress line after each)
    ev.bpd_condition = "label"       # class-conditional models: "label" (log p(x|y)) | "null"
    ev.bpd_every = 0                 # training: bound estimate every N steps (0 = off)
    ev.bpd_estimate_batches = 2      # ... on the first N eval batches
    ev.bpd_estimate_timesteps = 32   # ... with t = 0 plus one t from each of N strata
    ev.fid_num_samples = 50_000      # --mode=eval: samples for FID/KID/IS (0 = skip)
    ev.feature_net = "inception_v3"  # "inception_v3" | "mnist_classifier" (MNIST-FID, 28x28x1)
    ev.inception_weights = "~/.cache/ddpm_jax/pt_inception-2015-12-05-6726825d.npz"
    ev.fid_ref_split = "train"       # real images of data.name for the reference statistics
    ev.fid_ref_num_examples = 0      # 0 = the whole split
    ev.fid_every = 0                 # training: small-sample FID every N steps (0 = off)
    ev.fid_every_num_samples = 1000  # ... from this many samples (biased upwards vs. 50k)
    ev.kid_subset_size = 1000
    ev.kid_num_subsets = 100
    ev.kid_max_features = 10_000     # uniform subset of features kept for KID
    ev.is_splits = 10
    ev.text_num_prompts = 450        # --mode=text_eval: held-out prompts (90 meanings x 5)
    return config
