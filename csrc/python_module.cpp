// The Python module mtvision._C holds no functions: importing it loads the library, whose static
// initialisers register the ops with the dispatcher (torch.ops.mtvision.*).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
