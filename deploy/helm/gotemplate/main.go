// The chart's templates rendered by Go's own text/template (the engine inside helm), with
// stand-ins for the Sprig functions the chart uses, for check.py's cross-check of render.py:
//
//	gotemplate CHART_DIR ROOT.json  ->  {"template.yaml": "rendered", ...} or {"error": "..."}
//
// ROOT.json holds .Values (numbers as JSON numbers, float64 as in helm), .Release and .Chart.
// toYaml emits block YAML with JSON-quoted scalars (helm's emits plain scalars: the same data).
// Standard library only (Debian's golang-go builds it offline).
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"text/template"
)

type Files struct{ dir string }

func (f Files) Get(name string) string {
	b, err := os.ReadFile(filepath.Join(f.dir, name))
	if err != nil {
		return ""
	}
	return string(b)
}

func empty(v interface{}) bool {
	if v == nil {
		return true
	}
	r := reflect.ValueOf(v)
	switch r.Kind() {
	case reflect.String, reflect.Map, reflect.Slice:
		return r.Len() == 0
	case reflect.Bool:
		return !r.Bool()
	case reflect.Float64:
		return r.Float() == 0
	case reflect.Int:
		return r.Int() == 0
	}
	return false
}

func strval(v interface{}) string {
	switch s := v.(type) {
	case string:
		return s
	case nil:
		return ""
	}
	return fmt.Sprintf("%v", v)
}

func indent(n int, s string) string {
	pad := strings.Repeat(" ", n)
	return pad + strings.Replace(s, "\n", "\n"+pad, -1)
}

func scalar(v interface{}) string { b, _ := json.Marshal(v); return string(b) }

func toYaml(v interface{}, n int) string {
	pad := strings.Repeat(" ", n)
	var sb strings.Builder
	switch t := v.(type) {
	case map[string]interface{}:
		if len(t) == 0 {
			return "{}\n"
		}
		keys := make([]string, 0, len(t))
		for k := range t {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			switch c := t[k].(type) {
			case map[string]interface{}:
				if len(c) > 0 {
					sb.WriteString(pad + scalar(k) + ":\n" + toYaml(c, n+2))
					continue
				}
			case []interface{}:
				if len(c) > 0 {
					sb.WriteString(pad + scalar(k) + ":\n" + toYaml(c, n))
					continue
				}
			}
			sb.WriteString(pad + scalar(k) + ": " + scalar(t[k]) + "\n")
		}
	case []interface{}:
		for _, e := range t {
			sb.WriteString(pad + "- " + strings.TrimLeft(toYaml(e, n+2), " "))
		}
	default:
		sb.WriteString(pad + scalar(v) + "\n")
	}
	return sb.String()
}

func main() {
	chart, valuesFile := os.Args[1], os.Args[2]
	var root map[string]interface{}
	b, _ := os.ReadFile(valuesFile)
	if err := json.Unmarshal(b, &root); err != nil {
		panic(err)
	}
	root["Files"] = Files{chart}
	funcs := template.FuncMap{
		"toYaml":  func(v interface{}) string { return strings.TrimSuffix(toYaml(v, 0), "\n") },
		"toJson":  func(v interface{}) string { b, _ := json.Marshal(v); return string(b) },
		"nindent": func(n int, s string) string { return "\n" + indent(n, s) },
		"indent":  indent,
		"quote":   func(v interface{}) string { return strconv.Quote(strval(v)) },
		"default": func(d interface{}, v ...interface{}) interface{} {
			if len(v) == 0 || empty(v[0]) {
				return d
			}
			return v[0]
		},
		"required": func(msg string, v interface{}) (interface{}, error) {
			if empty(v) {
				return nil, errors.New(msg)
			}
			return v, nil
		},
		"fail": func(msg string) (string, error) { return "", errors.New(msg) },
	}
	out := map[string]string{}
	tdir := filepath.Join(chart, "templates")
	entries, _ := os.ReadDir(tdir)
	for _, e := range entries {
		src, _ := os.ReadFile(filepath.Join(tdir, e.Name()))
		t, err := template.New(e.Name()).Funcs(funcs).Option("missingkey=zero").Parse(string(src))
		if err != nil {
			fmt.Println(`{"error":` + strconv.Quote(err.Error()) + `}`)
			os.Exit(0)
		}
		var sb strings.Builder
		if err := t.Execute(&sb, root); err != nil {
			fmt.Println(`{"error":` + strconv.Quote(err.Error()) + `}`)
			os.Exit(0)
		}
		out[e.Name()] = strings.ReplaceAll(sb.String(), "<no value>", "")
	}
	j, _ := json.Marshal(out)
	fmt.Println(string(j))
}
