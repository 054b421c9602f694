using FlashAttn.Cli;

// On a GPU host the CUDA libtorch can come from a PyTorch install (FLASHATTN_TORCH_LIB), as for the tests.
if (FlashAttn.LibTorchLoader.LoadFromEnvironment())
    Console.Error.WriteLine($"libtorch from {FlashAttn.LibTorchLoader.LoadedFrom}");
return CliApp.Run(args, Console.Out, Console.Error);
