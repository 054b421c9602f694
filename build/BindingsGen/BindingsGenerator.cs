using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;

namespace BindingsGen;

/// <summary>
/// Turns FlashAttn.Native/include/flashattn.h into FlashAttn.Managed/Native/NativeMethods.*.g.cs.
/// A strict hand-written parser for the restricted grammar stated at the top of the header:
/// anything it does not understand is a <see cref="FormatException"/> naming the line.
/// </summary>
public static class BindingsGenerator
{
    /// <summary>Generated files are named NativeMethods.&lt;Area&gt;.g.cs (plus NativeMethods.Types.g.cs).</summary>
    public static readonly Regex GeneratedFileName = new(@"^NativeMethods\.[^.]+\.g\.cs$", RegexOptions.CultureInvariant);

    public const string TypesFileName = "NativeMethods.Types.g.cs";

    /// <summary>
    /// Parses <paramref name="headerText"/> and returns generated file name -> file content, sorted by
    /// name (ordinal). Contents use "\n" line endings and end with a newline.
    /// </summary>
    /// <exception cref="FormatException">The header leaves the grammar; the message names the line.</exception>
    public static IReadOnlyDictionary<string, string> Generate(string headerText, string headerDisplayPath)
    {
        ArgumentNullException.ThrowIfNull(headerText);
        ArgumentNullException.ThrowIfNull(headerDisplayPath);
        var text = headerText.Replace("\r\n", "\n").Replace('\r', '\n');
        if (text.Length > 0 && text[0] == '\uFEFF')
            text = text[1..];
        var source = new Source(text, headerDisplayPath);
        var tokens = new Lexer(source).Lex();
        var header = new Parser(source, tokens).Parse();
        return Emitter.Emit(header, headerDisplayPath);
    }

    /// <summary>BindingsGen &lt;header&gt; &lt;outDir&gt; [--check]</summary>
    public static int Run(string[] args)
    {
        const string usage = "usage: BindingsGen <header> <outDir> [--check]";
        var check = false;
        var positional = new List<string>();
        foreach (var arg in args)
        {
            if (arg == "--check")
                check = true;
            else if (arg is "-h" or "--help")
            {
                Console.WriteLine(usage);
                return 0;
            }
            else if (arg.StartsWith('-'))
            {
                Console.Error.WriteLine($"error: unknown option '{arg}'");
                Console.Error.WriteLine(usage);
                return 2;
            }
            else
                positional.Add(arg);
        }
        if (positional.Count != 2)
        {
            Console.Error.WriteLine(usage);
            return 2;
        }

        var headerPath = positional[0];
        var outDir = positional[1];
        if (!File.Exists(headerPath))
        {
            Console.Error.WriteLine($"error: header '{headerPath}' not found");
            return 2;
        }

        IReadOnlyDictionary<string, string> files;
        try
        {
            files = Generate(File.ReadAllText(headerPath), DisplayPath(headerPath));
        }
        catch (FormatException e)
        {
            Console.Error.WriteLine($"error: {e.Message}");
            return 2;
        }

        var stale = Directory.Exists(outDir)
            ? Directory.EnumerateFiles(outDir)
                .Select(Path.GetFileName)
                .OfType<string>()
                .Where(n => GeneratedFileName.IsMatch(n) && !files.ContainsKey(n))
                .Order(StringComparer.Ordinal)
                .ToList()
            : [];
        var utf8 = new UTF8Encoding(encoderShouldEmitUTF8Identifier: false);

        if (check)
        {
            var problems = new List<string>();
            foreach (var (name, content) in files)
            {
                var path = Path.Combine(outDir, name);
                if (!File.Exists(path))
                    problems.Add($"{path}: missing");
                else if (!File.ReadAllBytes(path).AsSpan().SequenceEqual(utf8.GetBytes(content)))
                    problems.Add($"{path}: differs from the header");
            }
            foreach (var name in stale)
                problems.Add($"{Path.Combine(outDir, name)}: stale (no longer generated)");

            if (problems.Count > 0)
            {
                Console.Error.WriteLine($"Bindings are out of date with {headerPath}:");
                foreach (var p in problems)
                    Console.Error.WriteLine($"  {p}");
                Console.Error.WriteLine("Run build/gen-bindings.sh to regenerate them.");
                return 1;
            }
            Console.WriteLine($"Bindings are up to date ({files.Count} files in {outDir}).");
            return 0;
        }

        Directory.CreateDirectory(outDir);
        var changed = 0;
        foreach (var (name, content) in files)
        {
            var path = Path.Combine(outDir, name);
            var bytes = utf8.GetBytes(content);
            if (File.Exists(path) && File.ReadAllBytes(path).AsSpan().SequenceEqual(bytes))
                continue;
            File.WriteAllBytes(path, bytes);
            Console.WriteLine($"wrote   {path}");
            changed++;
        }
        foreach (var name in stale)
        {
            var path = Path.Combine(outDir, name);
            File.Delete(path);
            Console.WriteLine($"deleted {path}");
            changed++;
        }
        if (changed == 0)
            Console.WriteLine($"Bindings already up to date ({files.Count} files in {outDir}).");
        return 0;
    }

    /// <summary>The header's path relative to the repository root (the directory holding global.json or .git), with '/'.</summary>
    private static string DisplayPath(string headerPath)
    {
        var full = Path.GetFullPath(headerPath);
        for (var dir = Path.GetDirectoryName(full); dir != null; dir = Path.GetDirectoryName(dir))
        {
            if (File.Exists(Path.Combine(dir, "global.json")) || Directory.Exists(Path.Combine(dir, ".git")))
                return Path.GetRelativePath(dir, full).Replace('\\', '/');
        }
        return headerPath.Replace('\\', '/');
    }

    // ------------------------------------------------------------------------------------------
    // Source text and errors

    private sealed class Source(string text, string displayPath)
    {
        private readonly string[] _lines = text.Split('\n');
        public string Text { get; } = text;

        public FormatException Error(int line, string message)
        {
            var lineText = line >= 1 && line <= _lines.Length ? _lines[line - 1].Trim() : "";
            return new FormatException($"{displayPath}:{line}: {message}\n    {line} | {lineText}");
        }
    }

    // ------------------------------------------------------------------------------------------
    // Lexer

    private enum TokenKind { Identifier, Number, Punct, LineComment, BlockComment, Directive, End }

    /// <param name="StartsLine">Nothing but whitespace precedes the token on its line.</param>
    private sealed record Token(TokenKind Kind, string Text, int Line, bool StartsLine)
    {
        public bool Is(string text) => (Kind is TokenKind.Identifier or TokenKind.Punct) && Text == text;

        public string Describe() => Kind switch
        {
            TokenKind.End => "end of file",
            TokenKind.LineComment => "a // comment",
            TokenKind.BlockComment => "a /* */ comment",
            TokenKind.Directive => "a preprocessor line",
            _ => $"'{Text}'",
        };
    }

    private sealed class Lexer(Source source)
    {
        private const string Punctuation = "(){},;*=-";

        public List<Token> Lex()
        {
            var s = source.Text;
            var tokens = new List<Token>();
            var i = 0;
            var line = 1;
            var lineHasToken = false;
            while (i < s.Length)
            {
                var c = s[i];
                if (c == '\n')
                {
                    line++;
                    lineHasToken = false;
                    i++;
                }
                else if (c is ' ' or '\t' or '\f' or '\v')
                {
                    i++;
                }
                else if (c == '/' && At(s, i + 1) == '*')
                {
                    var end = s.IndexOf("*/", i + 2, StringComparison.Ordinal);
                    if (end < 0)
                        throw source.Error(line, "unterminated /* comment");
                    tokens.Add(new Token(TokenKind.BlockComment, "", line, !lineHasToken));
                    line += CountNewlines(s, i, end);
                    lineHasToken = true;
                    i = end + 2;
                }
                else if (c == '/' && At(s, i + 1) == '/')
                {
                    var end = s.IndexOf('\n', i);
                    if (end < 0)
                        end = s.Length;
                    tokens.Add(new Token(TokenKind.LineComment, s[(i + 2)..end], line, !lineHasToken));
                    lineHasToken = true;
                    i = end;
                }
                else if (c == '#')
                {
                    if (lineHasToken)
                        throw source.Error(line, "'#' must start a line");
                    var startLine = line;
                    var sb = new StringBuilder();
                    i++;
                    while (i < s.Length && s[i] != '\n')
                    {
                        if (s[i] == '\\' && At(s, i + 1) == '\n')
                        {
                            sb.Append(' ');
                            line++;
                            i += 2;
                        }
                        else if (s[i] == '/' && At(s, i + 1) == '*')
                        {
                            var end = s.IndexOf("*/", i + 2, StringComparison.Ordinal);
                            if (end < 0)
                                throw source.Error(line, "unterminated /* comment");
                            line += CountNewlines(s, i, end);
                            sb.Append(' ');
                            i = end + 2;
                        }
                        else if (s[i] == '/' && At(s, i + 1) == '/')
                        {
                            while (i < s.Length && s[i] != '\n')
                                i++;
                        }
                        else
                        {
                            sb.Append(s[i]);
                            i++;
                        }
                    }
                    tokens.Add(new Token(TokenKind.Directive, sb.ToString().Trim(), startLine, true));
                    lineHasToken = true;
                }
                else if (char.IsAsciiLetter(c) || c == '_')
                {
                    var start = i;
                    while (i < s.Length && (char.IsAsciiLetterOrDigit(s[i]) || s[i] == '_'))
                        i++;
                    tokens.Add(new Token(TokenKind.Identifier, s[start..i], line, !lineHasToken));
                    lineHasToken = true;
                }
                else if (char.IsAsciiDigit(c))
                {
                    // Swallow suffixes and hex digits too, so that "1u" or "0x10" is one (rejected) token.
                    var start = i;
                    while (i < s.Length && (char.IsAsciiLetterOrDigit(s[i]) || s[i] == '_'))
                        i++;
                    tokens.Add(new Token(TokenKind.Number, s[start..i], line, !lineHasToken));
                    lineHasToken = true;
                }
                else if (Punctuation.Contains(c))
                {
                    tokens.Add(new Token(TokenKind.Punct, c.ToString(), line, !lineHasToken));
                    lineHasToken = true;
                    i++;
                }
                else
                {
                    throw source.Error(line, $"unexpected character '{c}'");
                }
            }
            tokens.Add(new Token(TokenKind.End, "", line, true));
            return tokens;
        }

        private static char At(string s, int i) => i < s.Length ? s[i] : '\0';

        private static int CountNewlines(string s, int from, int to)
        {
            var n = 0;
            for (var k = from; k < to; k++)
                if (s[k] == '\n')
                    n++;
            return n;
        }
    }

    // ------------------------------------------------------------------------------------------
    // Model

    /// <summary>A C type: optional const, a base type, pointer depth.</summary>
    private sealed record CType(string Base, bool IsConst, int PointerDepth)
    {
        public bool IsPointer => PointerDepth > 0;
        public string CText => (IsConst ? "const " : "") + Base + new string('*', PointerDepth);
    }

    private sealed record Parameter(CType Type, string Name);

    private sealed record Function(string Name, CType ReturnType, IReadOnlyList<Parameter> Parameters, IReadOnlyList<string> Docs);

    private sealed record Area(string Name, int Line, List<Function> Functions);

    private sealed record EnumMember(string CName, string CsName, int Value, IReadOnlyList<string> Docs);

    private sealed record EnumDef(string Name, IReadOnlyList<EnumMember> Members, IReadOnlyList<string> Docs);

    private sealed record Header(int AbiVersion, IReadOnlyList<EnumDef> Enums, IReadOnlyList<Area> Areas);

    // ------------------------------------------------------------------------------------------
    // Parser

    private sealed class Parser(Source source, List<Token> tokens)
    {
        /// <summary>C types usable by value, and their C# spelling (enums are added as they are declared).</summary>
        private static readonly Dictionary<string, string> ValueTypes = new(StringComparer.Ordinal)
        {
            ["void"] = "void",
            ["int32_t"] = "int",
            ["int64_t"] = "long",
            ["uint32_t"] = "uint",
            ["uint64_t"] = "ulong",
            ["float"] = "float",
            ["double"] = "double",
        };

        /// <summary>Types accepted only behind a pointer (which crosses as IntPtr).</summary>
        private static readonly HashSet<string> PointeeOnlyTypes = new(StringComparer.Ordinal)
        {
            "char", "int8_t", "uint8_t", "int16_t", "uint16_t",
        };

        private static readonly HashSet<string> CKeywords = new(StringComparer.Ordinal)
        {
            "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else", "enum",
            "extern", "float", "for", "goto", "if", "inline", "int", "long", "register", "restrict", "return",
            "short", "signed", "sizeof", "static", "struct", "switch", "typedef", "union", "unsigned", "void",
            "volatile", "while", "_Bool", "bool", "_Complex", "_Imaginary", "_Alignas", "_Alignof", "_Atomic",
            "_Generic", "_Noreturn", "_Static_assert", "_Thread_local",
        };

        private const string ApiMacro = "FLASHATTN_API";
        private const string ExternMacro = "FLASHATTN_EXTERN_C";
        private const string AbiVersionMacro = "FLASHATTN_ABI_VERSION";

        private static readonly Regex AreaComment = new(@"^\s*area\s*:(.*)$", RegexOptions.CultureInvariant);
        private static readonly Regex PascalName = new(@"^[A-Z][A-Za-z0-9]*$", RegexOptions.CultureInvariant);
        private static readonly Regex UpperSnakeName = new(@"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$", RegexOptions.CultureInvariant);
        private static readonly Regex Identifier = new(@"^[A-Za-z_][A-Za-z0-9_]*$", RegexOptions.CultureInvariant);

        private int _pos;
        private readonly Dictionary<string, EnumDef> _enumsByName = new(StringComparer.Ordinal);
        private readonly List<EnumDef> _enums = [];
        private readonly List<Area> _areas = [];
        private Area? _area;
        /// <summary>Every ordinary C identifier declared (functions, enum constants, typedef names) -> line.</summary>
        private readonly Dictionary<string, int> _declared = new(StringComparer.Ordinal);
        private readonly HashSet<string> _guardCandidates = new(StringComparer.Ordinal);
        private readonly Stack<int> _conditionals = new();
        private int? _abiVersion;

        public Header Parse()
        {
            var docs = new List<(int Line, string Text)>();
            while (true)
            {
                var tok = tokens[_pos];
                switch (tok.Kind)
                {
                    case TokenKind.End:
                        return Finish(tok);

                    case TokenKind.LineComment:
                        _pos++;
                        var area = AreaComment.Match(tok.Text);
                        if (area.Success)
                        {
                            if (!tok.StartsLine)
                                throw source.Error(tok.Line, "'// area:' must be on a line of its own");
                            StartArea(tok, area.Groups[1].Value.Trim());
                            docs.Clear();
                        }
                        else if (!tok.StartsLine)
                        {
                            docs.Clear(); // a trailing comment documents nothing
                        }
                        else
                        {
                            if (docs.Count > 0 && docs[^1].Line != tok.Line - 1)
                                docs.Clear(); // blank line in between: start a new block
                            docs.Add((tok.Line, DocText(tok.Text)));
                        }
                        break;

                    case TokenKind.BlockComment:
                        _pos++;
                        docs.Clear();
                        break;

                    case TokenKind.Directive:
                        _pos++;
                        Directive(tok);
                        docs.Clear();
                        break;

                    case TokenKind.Identifier when tok.Text == ApiMacro:
                        ParseFunction(AttachedDocs(docs, tok));
                        docs.Clear();
                        break;

                    case TokenKind.Identifier when tok.Text == "typedef":
                        ParseEnum(AttachedDocs(docs, tok));
                        docs.Clear();
                        break;

                    default:
                        throw source.Error(tok.Line,
                            $"unexpected {tok.Describe()}: expected '{ApiMacro} <type> <name>(<params>);', " +
                            "'typedef enum', a // comment or a preprocessor line");
                }
            }
        }

        private Header Finish(Token end)
        {
            if (_conditionals.Count > 0)
                throw source.Error(_conditionals.Peek(), "#if block is never closed by #endif");
            if (_abiVersion is not { } abi)
                throw source.Error(end.Line, $"'#define {AbiVersionMacro} <int>' is missing");
            foreach (var a in _areas)
                if (a.Functions.Count == 0)
                    throw source.Error(a.Line, $"area '{a.Name}' declares no functions");
            return new Header(abi, _enums, _areas);
        }

        /// <summary>The // block that ends on the line right above <paramref name="decl"/>, if any.</summary>
        private static IReadOnlyList<string> AttachedDocs(List<(int Line, string Text)> docs, Token decl) =>
            decl.StartsLine && docs.Count > 0 && docs[^1].Line == decl.Line - 1
                ? docs.Select(d => d.Text).ToList()
                : [];

        private static string DocText(string comment)
        {
            var t = comment.StartsWith(' ') ? comment[1..] : comment;
            return t.TrimEnd();
        }

        private void StartArea(Token tok, string name)
        {
            if (!PascalName.IsMatch(name))
                throw source.Error(tok.Line, $"area name '{name}' must be a PascalCase identifier (letters and digits)");
            if (name == "Types")
                throw source.Error(tok.Line, "area name 'Types' is reserved for NativeMethods.Types.g.cs");
            var previous = _areas.FirstOrDefault(a => string.Equals(a.Name, name, StringComparison.OrdinalIgnoreCase));
            if (previous != null)
                throw source.Error(tok.Line, $"duplicate area '{name}' (first on line {previous.Line})");
            _area = new Area(name, tok.Line, []);
            _areas.Add(_area);
        }

        // -- preprocessor --------------------------------------------------------------------

        private static readonly Regex DirectiveShape = new(@"^(?<kw>[A-Za-z_]+)\s*(?<rest>.*)$", RegexOptions.CultureInvariant);
        private static readonly Regex DefineShape = new(@"^(?<name>[A-Za-z_][A-Za-z0-9_]*)(?<rest>.*)$", RegexOptions.CultureInvariant);

        private void Directive(Token tok)
        {
            var m = DirectiveShape.Match(tok.Text);
            if (!m.Success)
                throw source.Error(tok.Line, "malformed preprocessor line");
            var kw = m.Groups["kw"].Value;
            var rest = m.Groups["rest"].Value.Trim();
            switch (kw)
            {
                case "include":
                    if (!Regex.IsMatch(rest, "^(<[^<>]+>|\"[^\"]+\")$"))
                        throw source.Error(tok.Line, "malformed #include");
                    break;
                case "ifndef":
                case "ifdef":
                    if (!Identifier.IsMatch(rest))
                        throw source.Error(tok.Line, $"#{kw} needs exactly one macro name");
                    if (kw == "ifndef")
                        _guardCandidates.Add(rest);
                    _conditionals.Push(tok.Line);
                    break;
                case "else":
                case "endif":
                    if (rest.Length > 0)
                        throw source.Error(tok.Line, $"unexpected text after #{kw}");
                    if (_conditionals.Count == 0)
                        throw source.Error(tok.Line, $"#{kw} without #ifdef/#ifndef");
                    if (kw == "endif")
                        _conditionals.Pop();
                    break;
                case "define":
                    Define(tok, rest);
                    break;
                default:
                    throw source.Error(tok.Line, $"unsupported preprocessor directive '#{kw}'");
            }
        }

        private void Define(Token tok, string text)
        {
            var m = DefineShape.Match(text);
            if (!m.Success)
                throw source.Error(tok.Line, "malformed #define");
            var name = m.Groups["name"].Value;
            var value = m.Groups["rest"].Value.Trim();
            if (name is ApiMacro or ExternMacro)
                return;
            if (name == AbiVersionMacro)
            {
                if (_abiVersion != null)
                    throw source.Error(tok.Line, $"duplicate #define {AbiVersionMacro}");
                _abiVersion = ParseInt(tok.Line, value, $"{AbiVersionMacro} must be a decimal int");
                return;
            }
            if (value.Length == 0 && !m.Groups["rest"].Value.StartsWith('(') && _guardCandidates.Contains(name))
                return; // include guard
            throw source.Error(tok.Line,
                $"unsupported #define '{name}' (only {AbiVersionMacro}, {ApiMacro}, {ExternMacro} and the include guard)");
        }

        private int ParseInt(int line, string text, string what)
        {
            var digits = text.StartsWith('-') ? text[1..] : text;
            if (digits.Length == 0 || !digits.All(char.IsAsciiDigit) || (digits.Length > 1 && digits[0] == '0'))
                throw source.Error(line, $"{what}, found '{text}'");
            if (!int.TryParse(text, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var v))
                throw source.Error(line, $"{what}: '{text}' is out of range");
            return v;
        }

        // -- token helpers inside declarations (comments are skipped there) -------------------

        private Token Peek(int ahead = 0)
        {
            var p = _pos;
            while (true)
            {
                var t = tokens[p];
                if (t.Kind is TokenKind.LineComment or TokenKind.BlockComment)
                {
                    p++;
                    continue;
                }
                if (ahead == 0)
                    return t;
                ahead--;
                p++;
                if (t.Kind == TokenKind.End)
                    return t;
            }
        }

        private Token Next()
        {
            while (tokens[_pos].Kind is TokenKind.LineComment or TokenKind.BlockComment)
                _pos++;
            var t = tokens[_pos];
            if (t.Kind == TokenKind.Directive)
                throw source.Error(t.Line, "preprocessor line inside a declaration");
            if (t.Kind != TokenKind.End)
                _pos++;
            return t;
        }

        private Token Expect(string text, string context)
        {
            var t = Next();
            if (!t.Is(text))
                throw source.Error(t.Line, $"expected '{text}' {context}, found {t.Describe()}");
            return t;
        }

        private Token ExpectName(string what)
        {
            var t = Next();
            if (t.Kind != TokenKind.Identifier || CKeywords.Contains(t.Text) || IsTypeName(t.Text) ||
                t.Text is ApiMacro or ExternMacro)
                throw source.Error(t.Line, $"expected {what}, found {t.Describe()}");
            return t;
        }

        private bool IsTypeName(string name) =>
            ValueTypes.ContainsKey(name) || PointeeOnlyTypes.Contains(name) || _enumsByName.ContainsKey(name);

        private void Declare(Token name)
        {
            if (_declared.TryGetValue(name.Text, out var first))
                throw source.Error(name.Line, $"duplicate name '{name.Text}' (first declared on line {first})");
            _declared[name.Text] = name.Line;
        }

        // -- functions ------------------------------------------------------------------------

        private void ParseFunction(IReadOnlyList<string> docs)
        {
            var api = Next();
            if (_area == null)
                throw source.Error(api.Line, $"{ApiMacro} declaration before any '// area: <Name>' line");

            var returnType = ParseType(isReturn: true);
            var name = ExpectName("a function name");
            Expect("(", $"after function name '{name.Text}'");

            var parameters = new List<Parameter>();
            if (Peek().Is("void") && Peek(1).Is(")"))
            {
                Next();
                Next();
            }
            else if (Peek().Is(")"))
            {
                var t = Next();
                throw source.Error(t.Line, $"empty parameter list of '{name.Text}': write '(void)'");
            }
            else
            {
                var names = new HashSet<string>(StringComparer.Ordinal);
                while (true)
                {
                    var type = ParseType(isReturn: false);
                    var pname = ExpectName("a parameter name");
                    if (!names.Add(pname.Text))
                        throw source.Error(pname.Line, $"duplicate parameter name '{pname.Text}' in '{name.Text}'");
                    parameters.Add(new Parameter(type, pname.Text));
                    var sep = Next();
                    if (sep.Is(")"))
                        break;
                    if (!sep.Is(","))
                        throw source.Error(sep.Line, $"expected ',' or ')' in the parameters of '{name.Text}', found {sep.Describe()}");
                }
            }
            Expect(";", $"after the declaration of '{name.Text}'");
            Declare(name);
            _area.Functions.Add(new Function(name.Text, returnType, parameters, docs));
        }

        private CType ParseType(bool isReturn)
        {
            var what = isReturn ? "a return type" : "a parameter type";
            var t = Next();
            var isConst = false;
            if (t.Is("const"))
            {
                isConst = true;
                t = Next();
            }
            if (t.Kind != TokenKind.Identifier)
                throw source.Error(t.Line, $"expected {what}, found {t.Describe()}");
            var baseName = t.Text;
            if (!IsTypeName(baseName))
                throw source.Error(t.Line, $"unknown type '{baseName}'");
            if (Peek().Is("const"))
                throw source.Error(Peek().Line, $"write 'const {baseName}', not '{baseName} const' (const pointers are not supported)");

            var depth = 0;
            while (Peek().Is("*"))
            {
                Next();
                depth++;
                if (Peek().Is("const"))
                    throw source.Error(Peek().Line, "const pointers ('T* const') are not supported");
            }

            var type = new CType(baseName, isConst, depth);
            if (depth == 0)
            {
                if (isConst)
                    throw source.Error(t.Line, $"'const' on a by-value {what[2..]} is not supported: drop it");
                if (PointeeOnlyTypes.Contains(baseName))
                    throw source.Error(t.Line, $"type '{baseName}' is only supported behind a pointer");
                if (baseName == "void" && !isReturn)
                    throw source.Error(t.Line, "a 'void' parameter is only allowed as the whole list '(void)'");
            }
            return type;
        }

        // -- enums ----------------------------------------------------------------------------

        private void ParseEnum(IReadOnlyList<string> docs)
        {
            Next(); // typedef
            var kw = Next();
            if (!kw.Is("enum"))
                throw source.Error(kw.Line, $"only 'typedef enum <Name> {{ ... }} <Name>;' is supported, found {kw.Describe()}");
            var tag = Next();
            if (tag.Kind != TokenKind.Identifier || CKeywords.Contains(tag.Text))
                throw source.Error(tag.Line, $"expected the enum's name after 'typedef enum', found {tag.Describe()}");
            if (!PascalName.IsMatch(tag.Text))
                throw source.Error(tag.Line, $"enum name '{tag.Text}' must be PascalCase");
            if (IsTypeName(tag.Text))
                throw source.Error(tag.Line, $"duplicate name '{tag.Text}': the type already exists");
            Expect("{", $"after 'typedef enum {tag.Text}'");

            var members = new List<(Token Name, int Value, IReadOnlyList<string> Docs)>();
            while (true)
            {
                var memberDocs = LeadingDocs();
                var t = Next();
                if (t.Is("}"))
                {
                    if (members.Count == 0)
                        throw source.Error(t.Line, $"enum '{tag.Text}' has no members");
                    break;
                }
                if (t.Kind != TokenKind.Identifier || CKeywords.Contains(t.Text))
                    throw source.Error(t.Line, $"expected an enum member of '{tag.Text}', found {t.Describe()}");
                if (!UpperSnakeName.IsMatch(t.Text))
                    throw source.Error(t.Line, $"enum member '{t.Text}' must be UPPER_SNAKE_CASE");
                var eq = Next();
                if (!eq.Is("="))
                    throw source.Error(eq.Line, $"enum member '{t.Text}' needs an explicit value ('{t.Text} = <int>')");
                var value = ParseEnumValue(t.Text);
                Declare(t);
                members.Add((t, value, memberDocs));
                var sep = Next();
                if (sep.Is("}"))
                    break;
                if (!sep.Is(","))
                    throw source.Error(sep.Line, $"expected ',' or '}}' after enum member '{t.Text}', found {sep.Describe()}");
            }
            var typedefName = Next();
            if (!typedefName.Is(tag.Text))
                throw source.Error(typedefName.Line, $"the typedef name must repeat the enum name '{tag.Text}', found {typedefName.Describe()}");
            Expect(";", $"after the enum '{tag.Text}'");

            Declare(tag);
            var prefixLength = CommonPrefixLength(members.Select(m => m.Name.Text).ToList());
            var csMembers = new List<EnumMember>();
            var csNames = new Dictionary<string, Token>(StringComparer.Ordinal);
            foreach (var (name, value, mdocs) in members)
            {
                var cs = PascalCase(name.Text[prefixLength..]);
                if (csNames.TryGetValue(cs, out var other))
                    throw source.Error(name.Line, $"enum members '{other.Text}' and '{name.Text}' both become '{cs}'");
                csNames[cs] = name;
                csMembers.Add(new EnumMember(name.Text, cs, value, mdocs));
            }
            var def = new EnumDef(tag.Text, csMembers, docs);
            _enumsByName[def.Name] = def;
            _enums.Add(def);
        }

        /// <summary>Consumes comment tokens before an enum member and returns the // block right above it.</summary>
        private List<string> LeadingDocs()
        {
            var docs = new List<(int Line, string Text)>();
            while (tokens[_pos].Kind is TokenKind.LineComment or TokenKind.BlockComment)
            {
                var t = tokens[_pos++];
                if (t.Kind == TokenKind.BlockComment || !t.StartsLine)
                {
                    docs.Clear();
                    continue;
                }
                if (docs.Count > 0 && docs[^1].Line != t.Line - 1)
                    docs.Clear();
                docs.Add((t.Line, DocText(t.Text)));
            }
            var next = tokens[_pos];
            return next.StartsLine && docs.Count > 0 && docs[^1].Line == next.Line - 1
                ? docs.Select(d => d.Text).ToList()
                : [];
        }

        private int ParseEnumValue(string member)
        {
            var t = Next();
            var negative = false;
            if (t.Is("-"))
            {
                negative = true;
                t = Next();
            }
            if (t.Kind != TokenKind.Number)
                throw source.Error(t.Line, $"enum member '{member}' needs an integer value, found {t.Describe()}");
            return ParseInt(t.Line, (negative ? "-" : "") + t.Text, $"the value of '{member}' must be a decimal int");
        }

        /// <summary>Length of the longest common "PREFIX_" that leaves every name a non-empty rest starting with a letter.</summary>
        private static int CommonPrefixLength(IReadOnlyList<string> names)
        {
            var first = names[0];
            var common = first.Length;
            foreach (var n in names)
            {
                var k = 0;
                while (k < common && k < n.Length && n[k] == first[k])
                    k++;
                common = k;
            }
            for (var j = Math.Min(common, first.Length) - 1; j >= 0; j--)
            {
                if (first[j] == '_' && names.All(n => n.Length > j + 1 && char.IsAsciiLetter(n[j + 1])))
                    return j + 1;
            }
            return 0;
        }

        private static string PascalCase(string upperSnake) =>
            string.Concat(upperSnake.Split('_').Select(w =>
                w.Length == 0 ? "" : char.ToUpperInvariant(w[0]) + w[1..].ToLowerInvariant()));
    }

    // ------------------------------------------------------------------------------------------
    // Emitter

    private static class Emitter
    {
        private const int MaxSingleLine = 120;

        private static readonly HashSet<string> CSharpKeywords = new(StringComparer.Ordinal)
        {
            "abstract", "as", "base", "bool", "break", "byte", "case", "catch", "char", "checked", "class",
            "const", "continue", "decimal", "default", "delegate", "do", "double", "else", "enum", "event",
            "explicit", "extern", "false", "finally", "fixed", "float", "for", "foreach", "goto", "if",
            "implicit", "in", "int", "interface", "internal", "is", "lock", "long", "namespace", "new", "null",
            "object", "operator", "out", "override", "params", "private", "protected", "public", "readonly",
            "ref", "return", "sbyte", "sealed", "short", "sizeof", "stackalloc", "static", "string", "struct",
            "switch", "this", "throw", "true", "try", "typeof", "uint", "ulong", "unchecked", "unsafe",
            "ushort", "using", "virtual", "void", "volatile", "while",
            "__arglist", "__makeref", "__reftype", "__refvalue",
        };

        public static IReadOnlyDictionary<string, string> Emit(Header header, string headerDisplayPath)
        {
            var files = new SortedDictionary<string, string>(StringComparer.Ordinal)
            {
                [TypesFileName] = Types(header, headerDisplayPath),
            };
            foreach (var area in header.Areas)
                files[$"NativeMethods.{area.Name}.g.cs"] = AreaFile(area, headerDisplayPath);
            return files;
        }

        private static StringBuilder Preamble(string headerDisplayPath)
        {
            var sb = new StringBuilder();
            sb.Append("// <auto-generated>\n");
            sb.Append($"//   Generated by build/BindingsGen from {headerDisplayPath}.\n");
            sb.Append("//   Do not edit: change the header, then run build/gen-bindings.sh.\n");
            sb.Append("// </auto-generated>\n");
            sb.Append("#nullable enable\n");
            sb.Append("using System.Runtime.InteropServices;\n");
            sb.Append('\n');
            sb.Append("namespace FlashAttn.Interop;\n");
            return sb;
        }

        private static string Types(Header header, string headerDisplayPath)
        {
            var sb = Preamble(headerDisplayPath);
            sb.Append('\n');
            sb.Append("internal static partial class NativeMethods\n{\n");
            sb.Append("    /// <summary>\n");
            sb.Append("    /// FLASHATTN_ABI_VERSION of the header these bindings were generated from; must equal\n");
            sb.Append("    /// FlashAttn_core_abi_version() of the loaded library.\n");
            sb.Append("    /// </summary>\n");
            sb.Append($"    internal const int AbiVersion = {header.AbiVersion.ToString(CultureInfo.InvariantCulture)};\n");
            sb.Append("}\n");
            foreach (var e in header.Enums)
            {
                sb.Append('\n');
                Docs(sb, "", e.Docs);
                sb.Append($"internal enum {e.Name} : int\n{{\n");
                for (var i = 0; i < e.Members.Count; i++)
                {
                    var m = e.Members[i];
                    if (m.Docs.Count > 0 && i > 0)
                        sb.Append('\n');
                    Docs(sb, "    ", m.Docs);
                    sb.Append($"    {m.CsName} = {m.Value.ToString(CultureInfo.InvariantCulture)},\n");
                }
                sb.Append("}\n");
            }
            return sb.ToString();
        }

        private static string AreaFile(Area area, string headerDisplayPath)
        {
            var sb = Preamble(headerDisplayPath);
            sb.Append('\n');
            sb.Append("internal static partial class NativeMethods\n{\n");
            for (var i = 0; i < area.Functions.Count; i++)
            {
                if (i > 0)
                    sb.Append('\n');
                Method(sb, area.Functions[i]);
            }
            sb.Append("}\n");
            return sb.ToString();
        }

        private static void Method(StringBuilder sb, Function f)
        {
            Docs(sb, "    ", f.Docs);
            sb.Append($"    [LibraryImport(LibraryName, EntryPoint = \"{f.Name}\")]\n");
            var head = $"    internal static partial {TypeText(f.ReturnType)} {Escape(f.Name)}(";
            var ps = f.Parameters.Select(p => $"{TypeText(p.Type)} {Escape(p.Name)}").ToList();
            var single = head + string.Join(", ", ps) + ");";
            if (ps.Count == 0 || single.Length <= MaxSingleLine)
            {
                sb.Append(single).Append('\n');
                return;
            }
            sb.Append(head).Append('\n');
            for (var i = 0; i < ps.Count; i++)
                sb.Append("        ").Append(ps[i]).Append(i == ps.Count - 1 ? ");\n" : ",\n");
        }

        private static string TypeText(CType t) => t.IsPointer
            ? $"IntPtr /* {t.CText} */"
            : t.Base switch
            {
                "void" => "void",
                "int32_t" => "int",
                "int64_t" => "long",
                "uint32_t" => "uint",
                "uint64_t" => "ulong",
                "float" => "float",
                "double" => "double",
                _ => t.Base, // an enum declared in the header (the parser checked it)
            };

        private static string Escape(string name) => CSharpKeywords.Contains(name) ? "@" + name : name;

        private static void Docs(StringBuilder sb, string indent, IReadOnlyList<string> docs)
        {
            if (docs.Count == 0)
                return;
            sb.Append(indent).Append("/// <summary>\n");
            foreach (var line in docs)
            {
                var text = line.Replace("&", "&amp;").Replace("<", "&lt;").Replace(">", "&gt;");
                sb.Append(indent).Append(text.Length == 0 ? "///" : "/// " + text).Append('\n');
            }
            sb.Append(indent).Append("/// </summary>\n");
        }
    }
}
