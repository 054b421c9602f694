using FlashAttn.Interop;
using TorchSharp;
using TorchSharp.Modules;
using static FlashAttn.Interop.TensorArgs;
using static TorchSharp.torch;

namespace FlashAttn;

/// <summary>
/// AdamW (torch.optim.AdamW's decoupled weight decay) over every parameter in a few CUDA launches, a drop-in for
/// TorchSharp's <c>torch.optim.AdamW</c>: the same parameter groups (<see cref="AdamW.ParamGroup"/>, per-group lr,
/// betas, eps, weight_decay), learning-rate schedulers, <c>state_dict</c> / <c>load_state_dict</c>. Besides:
/// <list type="bullet">
/// <item>the global gradient norm is computed on the device before the update, clipping to <see cref="max_norm"/>
/// (torch's clip_grad_norm_) is folded in, and a non-finite norm skips the whole step (no weight, moment or step count
/// changes; <see cref="found_inf"/> = 1, for an fp16 loss scaler). <see cref="grad_norm"/> and <see cref="found_inf"/>
/// are device scalars: nothing in <see cref="step"/> waits for the GPU, and the learning rate reaches the kernel
/// through a device table written without a host round trip;</item>
/// <item><c>master_weights</c>: 16-bit parameters get a float32 master copy, updated in float32 and rounded into the
/// parameter in the same pass;</item>
/// <item><see cref="accumulate_grad"/> adds 16-bit gradients into float32 sums between micro-batches and
/// <see cref="zero_grad()"/> sets gradients to none (PyTorch's default) instead of filling zeros.</item>
/// </list>
/// The moments (and masters) are float32 (float64 for float64 parameters), in flat buffers beside the parameters.
/// CUDA float32/float16/bfloat16 parameters on sm_80 or newer run the kernels; others the pure-TorchSharp reference
/// with the same semantics (<see cref="Backend.UsesKernels"/>). Defaults are TorchSharp's AdamW's (weight_decay 0;
/// PyTorch's is 0.01). amsgrad and maximize are not supported.
/// </summary>
public sealed class FusedAdamW : OptimizerHelper, optim.IBetas
{
    // Offsets into the flat state are multiples of this many elements (32 bytes: whole float32 vectors of the kernel).
    private const long Alignment = 8;

    internal sealed class Slot
    {
        public required Parameter Param;
        public required int Group;
        public required int Index;  // into the step counts
        public required long[] Shape;
        public required long Numel;
        public required ScalarType DType;
        public required bool HasMaster;
        public required State State;
        public long Offset = -1;    // into the flat state; -1 before the first layout
        public Tensor ExpAvg = null!, ExpAvgSq = null!, Step = null!;
        public long? HostStep = 0;  // Step's value where the host knows it; null after a kernel step (only the GPU does)
        public Tensor? Master;
        public bool HasSum;         // the gradient sum holds this step's earlier micro-batches

        public bool LowPrecision => DType is ScalarType.Float16 or ScalarType.BFloat16;
    }

    private readonly List<Slot> _slots = new();
    private readonly Dictionary<IntPtr, Slot> _byHandle = new();
    private Device? _device;
    private ScalarType _stateDtype = ScalarType.Float32;
    private bool _kernelEligible;
    private long _stateNumel;
    private Tensor? _master, _expAvg, _expAvgSq, _gradSum, _steps, _hparams, _workspace;
    private Tensor[] _hparamCells = [];   // 0-d views of _hparams, written with fill_ when a group's value changes
    private double[] _hparamValues = [];  // what _hparams holds (NaN: not written yet)
    private readonly Tensor _gradNorm, _foundInf;
    private Tensor? _gradScale;
    private double _maxNorm;

    /// <summary>AdamW over <paramref name="parameters"/> as one group; see the class summary.</summary>
    /// <param name="parameters">The parameters to optimize, all on one device.</param>
    /// <param name="lr">Learning rate.</param>
    /// <param name="beta1">Decay of the running average of the gradient.</param>
    /// <param name="beta2">Decay of the running average of the squared gradient.</param>
    /// <param name="eps">Added to the denominator for numerical stability.</param>
    /// <param name="weight_decay">Decoupled weight decay: each step multiplies the weight by 1 - lr * weight_decay.</param>
    /// <param name="amsgrad">Not supported: true is an ArgumentException.</param>
    /// <param name="maximize">Not supported: true is an ArgumentException.</param>
    /// <param name="master_weights">Keep a float32 master copy of every 16-bit parameter (mixed-precision training).</param>
    /// <param name="max_norm">Clip the global gradient norm to this (torch's clip_grad_norm_); 0: no clipping.</param>
    public FusedAdamW(IEnumerable<Parameter> parameters, double lr = 1e-3, double beta1 = 0.9, double beta2 = 0.999,
        double eps = 1e-8, double weight_decay = 0, bool amsgrad = false, bool maximize = false, bool master_weights = false,
        double max_norm = 0)
        : this([new AdamW.ParamGroup { Parameters = parameters }], lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
               master_weights, max_norm)
    {
    }

    /// <summary>AdamW over parameter groups, each with its own options (unset ones take these defaults); the other
    /// arguments as in the constructor over parameters.</summary>
    /// <param name="parameters">The parameter groups (TorchSharp's <see cref="AdamW.ParamGroup"/>), all on one device.</param>
    /// <param name="lr">Learning rate.</param>
    /// <param name="beta1">Decay of the running average of the gradient.</param>
    /// <param name="beta2">Decay of the running average of the squared gradient.</param>
    /// <param name="eps">Added to the denominator for numerical stability.</param>
    /// <param name="weight_decay">Decoupled weight decay: each step multiplies the weight by 1 - lr * weight_decay.</param>
    /// <param name="amsgrad">Not supported: true is an ArgumentException.</param>
    /// <param name="maximize">Not supported: true is an ArgumentException.</param>
    /// <param name="master_weights">Keep a float32 master copy of every 16-bit parameter (mixed-precision training).</param>
    /// <param name="max_norm">Clip the global gradient norm to this (torch's clip_grad_norm_); 0: no clipping.</param>
    public FusedAdamW(IEnumerable<AdamW.ParamGroup> parameters, double lr = 1e-3, double beta1 = 0.9, double beta2 = 0.999,
        double eps = 1e-8, double weight_decay = 0, bool amsgrad = false, bool maximize = false, bool master_weights = false,
        double max_norm = 0)
    {
        Require(parameters is not null, nameof(parameters), "parameters must not be null");
        var defaults = new AdamW.Options
        {
            LearningRate = lr, InitialLearningRate = lr, beta1 = beta1, beta2 = beta2, eps = eps,
            weight_decay = weight_decay, amsgrad = amsgrad, maximize = maximize,
        };
        CheckOptions(defaults, option => option);
        Require(!double.IsNaN(max_norm), nameof(max_norm), "max_norm must not be NaN (0: no clipping)");
        _defaults = defaults;
        _parameter_groups = new List<ParamGroup>();
        this.master_weights = master_weights;
        _maxNorm = max_norm;
        foreach (var group in parameters!) AddGroup(group, nameof(parameters));
        _gradNorm = zeros(Array.Empty<long>(), ScalarType.Float32, _device ?? CPU).DetachFromDisposeScope();
        _foundInf = zeros(Array.Empty<long>(), ScalarType.Float32, _device ?? CPU).DetachFromDisposeScope();
        Layout();
    }

    /// <summary>Whether 16-bit parameters have float32 master weights.</summary>
    public bool master_weights { get; }

    /// <summary>The global gradient norm is clipped to this before the update (0 or less: not clipped).</summary>
    public double max_norm
    {
        get => _maxNorm;
        set
        {
            Require(!double.IsNaN(value), nameof(max_norm), "max_norm must not be NaN (0: no clipping)");
            _maxNorm = value;
        }
    }

    /// <summary>A 0-d float32 tensor on the parameters' device that the gradients were multiplied by (an fp16 loss
    /// scale), divided out before the norm and the update; null for 1. Read on the device at each step.</summary>
    public Tensor? grad_scale
    {
        get => _gradScale;
        set
        {
            if (value is not null)
            {
                Require(value.numel() == 1 && value.dtype == ScalarType.Float32, nameof(grad_scale),
                        $"grad_scale must be a one-element float32 tensor, got {value.dtype} {Shape(value)}");
                Require(_device is null || SameDevice(value.device, _device), nameof(grad_scale),
                        $"grad_scale must be on the parameters' device ({_device}), got {value.device}");
            }
            _gradScale = value;
        }
    }

    /// <summary>0-d float32 on the parameters' device: the last step's global norm of the unscaled gradients, before
    /// clipping (inf or NaN when the step was skipped). Overwritten by each step; reading it waits for the GPU.</summary>
    public Tensor grad_norm => _gradNorm;

    /// <summary>0-d float32 on the parameters' device: 1 when the last step's gradients were not finite and the step was
    /// skipped, else 0. Overwritten by each step.</summary>
    public Tensor found_inf => _foundInf;

    /// <summary>Whether <see cref="step"/> runs the CUDA kernels (else the TorchSharp reference path).</summary>
    public bool uses_kernels => _kernelEligible && _slots.Count > 0 && Backend.UsesKernels(_slots[0].Param);

    public (double, double) Betas
    {
        get => (((AdamW.Options)_defaults).beta1!.Value, ((AdamW.Options)_defaults).beta2!.Value);
        set
        {
            ((AdamW.Options)_defaults).beta1 = value.Item1;
            ((AdamW.Options)_defaults).beta2 = value.Item2;
        }
    }

    /// <summary>Adds a parameter group (fine-tuning: unfrozen layers); its unset options take the defaults. The flat
    /// state is reallocated: views taken from <see cref="state"/> before refer to the old buffers.</summary>
    public override void add_param_group(ParamGroup param_group)
    {
        AddGroup(param_group, nameof(param_group));
        Layout();
    }

    /// <summary>The state of <paramref name="parameter"/>: its moments, master weight and step count.</summary>
    public State state(Parameter parameter)
    {
        Require(parameter is not null && _byHandle.ContainsKey(parameter.Handle), nameof(parameter),
                "parameter is not optimized by this FusedAdamW");
        return _byHandle[parameter!.Handle].State;
    }

    /// <summary>Sets a parameter's weight from <paramref name="value"/> (its shape, any floating dtype and device): the
    /// float32 master from the value itself and the 16-bit parameter from the master, so that a mixed-precision run
    /// starts from float32 weights rather than their 16-bit roundings. Without a master, sets the parameter.</summary>
    public void set_master_weight(Parameter parameter, Tensor value)
    {
        var slot = state(parameter).Slot;
        Require(value is not null && value.is_floating_point() && value.shape.SequenceEqual(slot.Shape), nameof(value),
                $"value must be a floating tensor of the parameter's shape [{string.Join(", ", slot.Shape)}], got " +
                (value is null ? "null" : $"{value.dtype} {Shape(value)}"));
        using var _ = no_grad();
        if (slot.Master is { } master)
        {
            master.copy_(value!);
            slot.Param.copy_(master);
        }
        else
        {
            slot.Param.copy_(value!);
        }
    }

    /// <summary>Sets every parameter's gradient to none (PyTorch's default), so that the next backward writes fresh
    /// gradients instead of adding to zeros; drops the micro-batch sums of <see cref="accumulate_grad"/>.</summary>
    public override void zero_grad() => zero_grad(set_to_none: true);

    /// <summary><see cref="zero_grad()"/>; with <paramref name="set_to_none"/> false the gradients are filled with zeros.</summary>
    public void zero_grad(bool set_to_none)
    {
        foreach (var s in _slots)
        {
            if (set_to_none)
            {
                s.Param.grad = null;
            }
            else
            {
                using var g = s.Param.grad;
                g?.zero_();
            }
            s.HasSum = false;
        }
    }

    /// <summary>
    /// Between micro-batches: adds the 16-bit parameters' gradients into float32 sums (one or a few launches; the first
    /// micro-batch of a step overwrites the sums, nothing is zero-filled) and sets those gradients to none, so the next
    /// backward writes fresh 16-bit gradients. <see cref="step"/> then reads the last micro-batch's gradients together
    /// with the sums. float32 parameters are left to autograd, which accumulates in float32 already.
    /// </summary>
    public void accumulate_grad()
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var taken = new List<(Slot slot, Tensor grad)>();
        foreach (var s in _slots)
        {
            if (!s.LowPrecision || s.Param.grad is not { } g || s.Numel == 0) continue;
            RequireGradient(s, g);
            taken.Add((s, g.is_contiguous() ? g : g.contiguous()));
        }
        if (taken.Count == 0) return;
        _gradSum ??= empty(_stateNumel, _stateDtype, _device).DetachFromDisposeScope();
        if (uses_kernels)
        {
            var grads = new IntPtr[taken.Count];
            var dtypes = new int[taken.Count];
            var numels = new long[taken.Count];
            var offsets = new long[taken.Count];
            var flags = new int[taken.Count];
            for (int i = 0; i < taken.Count; i++)
            {
                var (s, g) = taken[i];
                (grads[i], dtypes[i], numels[i], offsets[i]) = (Ptr(g), (int)DType(s.DType), s.Numel, s.Offset);
                flags[i] = s.HasSum ? (int)FlashAttnOptimTensorFlag.GradSum : 0;
            }
            unsafe
            {
                fixed (IntPtr* gp = grads)
                fixed (int* dp = dtypes, fp = flags)
                fixed (long* np = numels, op = offsets)
                    NativeMethods.Check(NativeMethods.FlashAttn_optim_grad_accumulate(taken.Count, (IntPtr)gp, (IntPtr)dp,
                        (IntPtr)np, (IntPtr)op, (IntPtr)fp, Ptr(_gradSum), _stateNumel, IntPtr.Zero));
            }
        }
        else
        {
            using var scalars = new ScalarScope();
            var one = scalars.Of(1);  // add_'s alpha, which TorchSharp would otherwise make (and leave to the finalizer) per tensor
            foreach (var (s, g) in taken)
            {
                var sum = GradSumView(s);
                if (s.HasSum) sum.add_(g, one);
                else sum.copy_(g);
            }
        }
        foreach (var (s, _) in taken)
        {
            s.HasSum = true;
            s.Param.grad = null;
        }
    }

    /// <summary>One AdamW step over every parameter with a gradient (or a micro-batch sum); parameters without either
    /// are skipped, as torch.optim.AdamW does. Waits for nothing on the GPU. Returns the closure's loss, if any.</summary>
    public override Tensor step(Func<Tensor>? closure = null)
    {
        Tensor? loss = null;
        if (closure is not null)
        {
            using var grad = enable_grad();
            loss = closure();
        }
        using (var scope = NewDisposeScope())
        using (var _ = no_grad())
        {
            var taken = new List<(Slot slot, Tensor? grad)>();
            foreach (var s in _slots)
            {
                var g = s.Param.grad;
                // an empty parameter has nothing to update (and no storage the kernels could point at)
                if ((g is null && !s.HasSum) || s.Numel == 0) continue;
                if (g is not null) RequireGradient(s, g);
                taken.Add((s, g is null || g.is_contiguous() ? g : g.contiguous()));
            }
            if (taken.Count == 0)
            {
                _gradNorm.zero_();
                _foundInf.zero_();
            }
            else if (uses_kernels) StepKernel(taken);
            else StepReference(taken);
            foreach (var s in _slots) s.HasSum = false;
        }
        return loss!;
    }

    // A gradient set by hand must match its parameter before the kernels read it with the parameter's sizes.
    private static void RequireGradient(Slot s, Tensor g) =>
        Require(g.dtype == s.DType && g.numel() == s.Numel && SameDevice(g.device, s.Param.device), "parameters",
                $"the gradient of a parameter {Shape(s.Param)} {s.DType} on {s.Param.device} is {Shape(g)} {g.dtype} on {g.device}");

    private unsafe void StepKernel(List<(Slot slot, Tensor? grad)> taken)
    {
        WriteHyperparameters();
        int n = taken.Count;
        var parameters = new IntPtr[n];
        var grads = new IntPtr[n];
        var dtypes = new int[n];
        var numels = new long[n];
        var offsets = new long[n];
        var flags = new int[n];
        var stepIndices = new int[n];
        var groups = new int[n];
        for (int i = 0; i < n; i++)
        {
            var (s, g) = taken[i];
            (parameters[i], grads[i], dtypes[i]) = (Ptr(s.Param), PtrOrNull(g), (int)DType(s.DType));
            (numels[i], offsets[i], stepIndices[i], groups[i]) = (s.Numel, s.Offset, s.Index, s.Group);
            flags[i] = (s.HasMaster ? (int)FlashAttnOptimTensorFlag.Master : 0) |
                       (s.HasSum ? (int)FlashAttnOptimTensorFlag.GradSum : 0);
        }
        fixed (IntPtr* pp = parameters, gp = grads)
        fixed (int* dp = dtypes, fp = flags, sp = stepIndices, grp = groups)
        fixed (long* np = numels, op = offsets)
            NativeMethods.Check(NativeMethods.FlashAttn_optim_adamw_step(n, (IntPtr)pp, (IntPtr)gp, (IntPtr)dp, (IntPtr)np,
                (IntPtr)op, (IntPtr)fp, (IntPtr)sp, (IntPtr)grp, PtrOrNull(_master), Ptr(_expAvg!), Ptr(_expAvgSq!),
                PtrOrNull(_gradSum), _stateNumel, Ptr(_steps!), _slots.Count, Ptr(_hparams!), _parameter_groups.Count,
                PtrOrNull(_gradScale), (float)_maxNorm, Ptr(_gradNorm), Ptr(_foundInf), Ptr(_workspace!),
                _workspace!.numel(), IntPtr.Zero));
        // the kernel increments the counts unless the norm was not finite, which only the GPU knows yet
        foreach (var (s, _) in taken) s.HostStep = null;
    }

    private void StepReference(List<(Slot slot, Tensor? grad)> taken)
    {
        var tensors = new List<Reference.AdamWTensor>(taken.Count);
        foreach (var (s, g) in taken)
        {
            var o = (AdamW.Options)_parameter_groups[s.Group].Options;
            // the reference path counts steps on the host: one read of the device count after kernel steps, if ever
            s.HostStep ??= (long)s.Step.item<float>();
            tensors.Add(new Reference.AdamWTensor(s.Param, g, s.HasSum ? GradSumView(s) : null, s.Master, s.ExpAvg, s.ExpAvgSq,
                s.Step, s.HostStep.Value, o.LearningRate!.Value, o.beta1!.Value, o.beta2!.Value, o.eps!.Value, o.weight_decay!.Value));
        }
        if (Reference.adamw_step(tensors, _gradScale, _maxNorm, _gradNorm, _foundInf))
            foreach (var (s, _) in taken) s.HostStep++;
    }

    // The groups' (lr, beta1, beta2, eps, weight_decay) into the device table, element by element with fill_ (a launch
    // with the value as its argument: no host-to-device copy, no wait), only where a value changed: with a scheduler, each
    // group's lr at every step, each value a Scalar freed here rather than by the finalizer.
    private void WriteHyperparameters()
    {
        using var scalars = new ScalarScope();
        for (int g = 0; g < _parameter_groups.Count; g++)
        {
            var o = (AdamW.Options)_parameter_groups[g].Options;
            ReadOnlySpan<double> values = [o.LearningRate!.Value, o.beta1!.Value, o.beta2!.Value, o.eps!.Value, o.weight_decay!.Value];
            for (int k = 0; k < values.Length; k++)
            {
                int i = g * values.Length + k;
                if (_hparamValues[i].Equals(values[k])) continue;
                _hparamCells[i].fill_(scalars.Of(values[k]));
                _hparamValues[i] = values[k];
            }
        }
    }

    private Tensor GradSumView(Slot s) => _gradSum!.narrow(0, s.Offset, s.Numel).view(s.Shape);

    private void AddGroup(ParamGroup group, string paramName)
    {
        Require(group is not null, paramName, "a parameter group must not be null");
        group!.Options ??= new AdamW.Options();
        Require(group.Options is AdamW.Options, paramName,
                $"a parameter group's options must be AdamW.Options (an AdamW.ParamGroup), got {group.Options.GetType().Name}");
        var o = (AdamW.Options)group.Options;
        var d = (AdamW.Options)_defaults;
        o.LearningRate ??= d.LearningRate;
        o.beta1 ??= d.beta1;
        o.beta2 ??= d.beta2;
        o.eps ??= d.eps;
        o.weight_decay ??= d.weight_decay;
        o.amsgrad ??= d.amsgrad;
        o.maximize ??= d.maximize;
        CheckOptions(o, option => paramName);
        o.InitialLearningRate = o.LearningRate!.Value;
        Require(group.Parameters is not null, paramName, "a parameter group's Parameters must not be null");
        var parameters = group.Parameters!.ToList();
        var seen = new HashSet<IntPtr>();
        var device = _device;
        foreach (var p in parameters)
        {
            Require(p is not null, paramName, "a parameter group holds a null parameter");
            Require(!_byHandle.ContainsKey(p!.Handle) && seen.Add(p.Handle), paramName,
                    "some parameters appear more than once (in one parameter group or in several)");
            Require(p.dtype is ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float32 or ScalarType.Float64, paramName,
                    $"parameters must be float16, bfloat16, float32 or float64, got {p.dtype}");
            Require(_expAvg is null || p.dtype != ScalarType.Float64 || _stateDtype == ScalarType.Float64, paramName,
                    "a float64 parameter cannot join a FusedAdamW whose state is float32");
            device ??= p.device;
            Require(SameDevice(p.device, device), paramName, $"parameters must all be on one device ({device}), got one on {p.device}");
        }
        _device = device;
        group.Parameters = parameters;
        int groupIndex = _parameter_groups.Count;
        _parameter_groups.Add(group);
        foreach (var p in parameters)
        {
            var slot = new Slot
            {
                Param = p, Group = groupIndex, Index = _slots.Count, Shape = p.shape, Numel = p.numel(), DType = p.dtype,
                HasMaster = master_weights && p.dtype is ScalarType.Float16 or ScalarType.BFloat16, State = null!,
            };
            slot.State = new State(p, slot);
            _slots.Add(slot);
            _byHandle[p.Handle] = slot;
            _state[p.Handle] = slot.State;
        }
    }

    private static bool SameDevice(Device a, Device b) => a.type == b.type && a.index == b.index;

    private static void CheckOptions(AdamW.Options o, Func<string, string> name)
    {
        double lr = o.LearningRate!.Value, beta1 = o.beta1!.Value, beta2 = o.beta2!.Value, eps = o.eps!.Value, wd = o.weight_decay!.Value;
        Require(lr >= 0, name("lr"), $"lr ({lr}) must be >= 0");
        Require(beta1 is >= 0 and < 1, name("beta1"), $"beta1 ({beta1}) must be in [0, 1)");
        Require(beta2 is >= 0 and < 1, name("beta2"), $"beta2 ({beta2}) must be in [0, 1)");
        Require(eps >= 0, name("eps"), $"eps ({eps}) must be >= 0");
        Require(wd >= 0, name("weight_decay"), $"weight_decay ({wd}) must be >= 0");
        Require(o.amsgrad != true, name("amsgrad"), "amsgrad is not supported by FusedAdamW (use torch.optim.AdamW)");
        Require(o.maximize != true, name("maximize"), "maximize is not supported by FusedAdamW (use torch.optim.AdamW)");
    }

    // Allocates the flat state for every slot (keeping the values of slots that had state) and the device tables.
    private void Layout()
    {
        using var scope = NewDisposeScope();  // the optimizer may be built inside a caller's scope: keep what it stores
        using var _ = no_grad();
        static Tensor Keep(Tensor t) => t.DetachFromDisposeScope();
        var device = _device ?? CPU;
        var stateDtype = _slots.Any(s => s.DType == ScalarType.Float64) ? ScalarType.Float64 : ScalarType.Float32;
        _stateDtype = stateDtype;
        long total = 0;
        var offsets = new long[_slots.Count];
        for (int i = 0; i < _slots.Count; i++)
        {
            offsets[i] = total;
            total += (_slots[i].Numel + Alignment - 1) / Alignment * Alignment;
        }
        var expAvg = zeros(total, stateDtype, device);
        var expAvgSq = zeros(total, stateDtype, device);
        var master = _slots.Any(s => s.HasMaster) ? empty(total, stateDtype, device) : null;
        var steps = zeros(_slots.Count, ScalarType.Float32, device);
        for (int i = 0; i < _slots.Count; i++)
        {
            var s = _slots[i];
            Tensor View(Tensor flat) => flat.narrow(0, offsets[i], s.Numel).view(s.Shape);
            var (m, v, w, t) = (Keep(View(expAvg)), Keep(View(expAvgSq)), master is null || !s.HasMaster ? null : Keep(View(master)),
                                Keep(steps[i]));
            if (s.Offset >= 0)
            {
                m.copy_(s.ExpAvg);
                v.copy_(s.ExpAvgSq);
                w?.copy_(s.Master!);
                t.copy_(s.Step);
                s.ExpAvg.Dispose(); s.ExpAvgSq.Dispose(); s.Master?.Dispose(); s.Step.Dispose();
            }
            else
            {
                w?.copy_(s.Param);
            }
            (s.ExpAvg, s.ExpAvgSq, s.Master, s.Step, s.Offset, s.HasSum) = (m, v, w, t, offsets[i], false);
        }
        foreach (var old in new[] { _expAvg, _expAvgSq, _master, _steps, _gradSum, _hparams, _workspace }) old?.Dispose();
        foreach (var cell in _hparamCells) cell.Dispose();
        (_expAvg, _expAvgSq, _master, _steps, _gradSum, _stateNumel) = (Keep(expAvg), Keep(expAvgSq), master is null ? null : Keep(master),
                                                                         Keep(steps), null, total);

        _hparams = Keep(empty(_parameter_groups.Count, 5, ScalarType.Float64, device));
        _hparamCells = Enumerable.Range(0, _parameter_groups.Count * 5).Select(i => Keep(_hparams[i / 5, i % 5])).ToArray();
        _hparamValues = Enumerable.Repeat(double.NaN, _hparamCells.Length).ToArray();
        _kernelEligible = stateDtype == ScalarType.Float32 && device.type == DeviceType.CUDA && Backend.NativeHasCuda &&
                          _slots.All(s => IsLowOrSingleFloat(s.DType) && s.Param.is_contiguous());
        _workspace = _kernelEligible
            ? Keep(empty(NativeMethods.FlashAttn_optim_adamw_workspace_size(_slots.Count), ScalarType.Byte, device))
            : null;
    }

    protected override void Dispose(bool disposing)
    {
        base.Dispose(disposing);
        if (!disposing) return;
        foreach (var s in _slots)
        {
            s.ExpAvg?.Dispose(); s.ExpAvgSq?.Dispose(); s.Master?.Dispose(); s.Step?.Dispose();
        }
        foreach (var cell in _hparamCells) cell.Dispose();
        foreach (var t in new[] { _expAvg, _expAvgSq, _master, _steps, _gradSum, _hparams, _workspace, _gradNorm, _foundInf })
            t?.Dispose();
    }

    /// <summary>
    /// A parameter's state, views into the optimizer's flat buffers: <see cref="exp_avg"/>, <see cref="exp_avg_sq"/>,
    /// <see cref="master"/> (null without master weights) and <see cref="step"/>. Loading copies values in; it accepts a
    /// FusedAdamW state or a TorchSharp AdamW one (without amsgrad), so a run can move from torch.optim.AdamW.
    /// </summary>
    public sealed class State : OptimizerState
    {
        internal State(Parameter parameter, Slot slot) : base(parameter) => Slot = slot;

        internal Slot Slot { get; }

        public Tensor exp_avg => Slot.ExpAvg;
        public Tensor exp_avg_sq => Slot.ExpAvgSq;
        public Tensor? master => Slot.Master;

        /// <summary>Steps taken (the t of the bias corrections); kept as float32 on the device (exact to 2^24). Reading
        /// it after a kernel step waits for the GPU.</summary>
        public long step
        {
            get => Slot.HostStep ?? (long)Slot.Step.item<float>();
            set
            {
                using (var scalars = new ScalarScope()) Slot.Step.fill_(scalars.Of(value));
                Slot.HostStep = value;
            }
        }

        public override void Initialize(OptimizerOptions options) { }

        public override void to(Device device)
        {
            if (!SameDevice(device, Slot.ExpAvg.device))
                throw new NotSupportedException($"FusedAdamW keeps its state in flat buffers on {Slot.ExpAvg.device}: " +
                                                "move the model first, then create the optimizer");
        }

        public override void SaveStateDict(BinaryWriter writer)
        {
            writer.Write(step);
            exp_avg.Save(writer);
            exp_avg_sq.Save(writer);
            writer.Write(master is not null);
            master?.Save(writer);
        }

        public override void LoadStateDict(BinaryReader reader)
        {
            step = reader.ReadInt64();
            Read(reader, exp_avg, "exp_avg");
            Read(reader, exp_avg_sq, "exp_avg_sq");
            var hasMaster = reader.ReadBoolean();
            if (hasMaster != (master is not null))
                throw new InvalidDataException($"the saved state {(hasMaster ? "has" : "has no")} master weight but this optimizer " +
                                               $"{(master is null ? "keeps none" : "keeps one")} (master_weights)");
            if (master is not null) Read(reader, master, "master");
        }

        public override void LoadStateDict(OptimizerState source)
        {
            using var _ = no_grad();
            switch (source)
            {
                case State s:
                    Require(s.exp_avg.shape.SequenceEqual(exp_avg.shape), nameof(source),
                            $"the source state is of shape {Shape(s.exp_avg)}, this parameter's {Shape(exp_avg)}");
                    exp_avg.copy_(s.exp_avg);
                    exp_avg_sq.copy_(s.exp_avg_sq);
                    if (master is not null && s.master is not null) master.copy_(s.master);
                    step = s.step;
                    break;
                case AdamW.State s:
                    Require(s.max_exp_avg_sq is null, nameof(source), "an amsgrad state cannot be loaded (FusedAdamW has no amsgrad)");
                    Require(s.exp_avg.shape.SequenceEqual(exp_avg.shape), nameof(source),
                            $"the source state is of shape {Shape(s.exp_avg)}, this parameter's {Shape(exp_avg)}");
                    exp_avg.copy_(s.exp_avg);
                    exp_avg_sq.copy_(s.exp_avg_sq);
                    step = s.step;
                    break;
                default:
                    throw new ArgumentException($"cannot load a {source?.GetType().Name ?? "null"} state into FusedAdamW", nameof(source));
            }
        }

        public override bool ApproximatelyEquals(OptimizerState other) =>
            other is State s && s.step == step && s.exp_avg.allclose(exp_avg) && s.exp_avg_sq.allclose(exp_avg_sq) &&
            (master is null ? s.master is null : s.master is not null && s.master.allclose(master));

        private static void Read(BinaryReader reader, Tensor into, string what)
        {
            using var t = TensorExtensionMethods.Load(reader);
            if (!t.shape.SequenceEqual(into.shape))
                throw new InvalidDataException($"the saved {what} is of shape {Shape(t)}, the parameter's state {Shape(into)}");
            using var _ = no_grad();
            into.copy_(t);
        }
    }
}
