return BindingsGen.BindingsGenerator.Run(args);
