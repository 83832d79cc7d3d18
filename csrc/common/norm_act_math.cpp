// Definitions the vectorised math of norm_act_math.h reads (see there).
#include "norm_act_math.h"

namespace resfast {

const float kExpClampLow = -87.0f;
const float kExpClampHigh = 89.0f;

}  // namespace resfast
